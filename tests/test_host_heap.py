"""server/model/host_heap.py: with retain_freed_heap() a step's freed activation-sized blocks are reused, not
faulted back in page by page (checked in fresh interpreters: the setting is process-wide)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# An engine-like thread (a non-main malloc arena): each "step" allocates and frees blocks of 64 KiB..12 MiB in an
# interleaved order; prints the page faults of each of 12 steps.
PROBE = """
import sys, threading, torch
from server.model.host_heap import retain_freed_heap
took = retain_freed_heap() if sys.argv[1] == "retain" else None
def faults():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])
per_step = []
def steps():
    for _ in range(12):
        before = faults()
        for size in (1 << 18, 3 << 18, 3 << 20, 1 << 20, 12 << 20):
            x = torch.ones(size // 4); y = torch.ones(size // 8); del x
            z = torch.ones(size // 2); del y, z
        per_step.append(faults() - before)
t = threading.Thread(target=steps); t.start(); t.join()
print(took, *per_step)
"""


def settled_faults(mode: str) -> tuple[str, int]:
    """(what retain_freed_heap returned, page faults of the last 6 steps, after 6 steps of warm-up)."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, timeout=120)
    took, *per_step = out.stdout.split()
    return took, sum(map(int, per_step[6:]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc are Linux's")
def test_freed_blocks_are_reused_instead_of_faulted_back() -> None:
    took, retained = settled_faults("retain")
    assert took == "True"
    _, default = settled_faults("default")
    assert default > 6 * 1000, f"glibc's default returns such blocks and faults them back: {default} faults"
    assert retained < 100, f"{retained} page faults in 6 steps once the heap retains freed blocks"
