"""Crash safety end to end: a server process SIGKILLed in the middle of uploads, restarted on the same data
directory, has every upload that returned success (intact and servable) and nothing half-written."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clients import SwitchboardClient
from server.adapters.store import STAGING, AdapterStore
from tests.adapter_files import peft_adapter
from tests.peft_adapters import ALL_PROJ

ROOT = Path(__file__).resolve().parents[1]


def start_server(model_dir: Path, data_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`python -m server serve` in a child process (extra: more flags); (process, target) once it serves."""
    cmd = [sys.executable, "-m", "server", "serve", "--model", str(model_dir), "--port", "0", "--no-metrics",
           "--http-port", "0", "--data-dir", str(data_dir), "--no-quantize", "--max-lora-rank", "8",
           "--device-slots", "4", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"serving on (\S+?)[;\s]", line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            proc.banner = line  # "... serving on HOST:PORT; OpenAI API at http://HOST:PORT/v1"
            return proc, m[1]
    proc.kill()
    raise AssertionError("the server did not start:\n" + "".join(lines[-30:]))


@pytest.mark.timeout(300)
def test_sigkill_mid_uploads_keeps_exactly_the_completed_ones(tiny_llama_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    adapter = peft_adapter(tiny_llama_dir, rank=8, targets=tuple(ALL_PROJ), seed=81)  # ~100 KB
    proc, target = start_server(tiny_llama_dir, data)
    completed: set[str] = set()
    started: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def uploader(worker: int) -> None:
        with SwitchboardClient(target, timeout=30) as c:
            for i in range(10_000):
                if stop.is_set():
                    return
                name = f"u{worker}-{i}"
                with lock:
                    started.add(name)
                try:
                    c.upload_adapter(adapter, name, chunk_bytes=2048)  # many small chunks: kills land mid-stream
                except Exception:
                    return  # the server is gone
                with lock:
                    completed.add(name)

    threads = [threading.Thread(target=uploader, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        while len(completed) < 12:
            time.sleep(0.02)
            assert proc.poll() is None, "the server died on its own"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        if proc.poll() is None:
            proc.kill()
    with lock:
        done, tried = set(completed), set(started)
    leftovers = list((data / "adapters" / STAGING).glob("*")) if (data / "adapters" / STAGING).exists() else []

    proc, target = start_server(tiny_llama_dir, data)
    try:
        with SwitchboardClient(target, timeout=60) as c:
            present = {a.name for a in c.list_adapters()}
            sample = sorted(done)[:3]
            outputs = [c.generate(token_ids=[5, 6, 7], adapter=name, max_new_tokens=3) for name in sample]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    print(f"\ncrash: {len(done)} uploads completed, {len(tried - done)} in flight at the kill, "
          f"{len(leftovers)} staging leftovers before restart, {len(present)} adapters after restart")
    assert done <= present, f"completed uploads lost: {sorted(done - present)}"
    assert present <= tried
    assert len(present - done) <= len(tried - done)  # at most the in-flight ones whose commit landed
    assert all(o.completion_tokens == 3 for o in outputs)
    store = AdapterStore(data / "adapters")  # reopening also shows the staging area was cleaned
    for tenant, name in store.names():
        for version in store.versions(tenant, name):
            store.verify(version)
    assert not (data / "adapters" / STAGING).exists() or not any((data / "adapters" / STAGING).iterdir())
