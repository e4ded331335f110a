"""The Triton kernels compiled for real GPUs (sm_80, sm_90) on a machine without one: every launch the engine makes
(kernels/aot.py's engine_launches) must compile, fit the arch's shared memory, and not spill registers. The other
tests run these kernels under TRITON_INTERPRET=1, which never lowers them; this one runs `python -m kernels.aot` in a
subprocess without it. The table (registers, shared memory, spills) is printed (pytest -s shows it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_triton_kernels_compile_for_sm80_and_sm90(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "kernels.aot", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, f"a Triton kernel does not compile for a GPU:\n{proc.stderr[-6000:]}"
    rows = json.loads(out.read_text())
    from kernels.aot import ARCHS, engine_launches

    assert len(rows) == len(engine_launches()) * len(ARCHS)
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90a"}
    assert {r["launch"]["kernel"] for r in rows} == {"shrink", "expand"}
    for r in rows:
        where = f"{r['launch']} on {r['arch']}"
        assert 0 < r["registers"] <= 255, where
        assert r["fits"], f"{where} asks {r['shared_bytes']} bytes of shared memory: more than a block may have"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{where} spills registers"
