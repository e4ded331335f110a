"""Our server as the benchmarks use it: a `python -m server serve` subprocess on loopback, adapter
uploads through the Admin API, and requests driven by the async client (bench.load_test's closed loop)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.load_run import PlannedRequest, Workload, run_closed_loop
from bench.peft_peers import BenchRequest, PeerResult

ROOT = Path(__file__).resolve().parents[1]
_SERVING = re.compile(r"serving on (\S+?);?\s")


@dataclass(frozen=True, slots=True)
class ServerProcess:
    target: str
    api_key: str | None
    proc: subprocess.Popen
    log_path: Path


@contextmanager
def server_subprocess(*, quantize: bool, device_slots: int, max_lora_rank: int, max_running: int,
                      model: str | None = None, extra: tuple[str, ...] = (), start_timeout_s: float = 600.0
                      ) -> Iterator[ServerProcess]:
    """Start the server on a free loopback port with a fresh data dir; SIGTERM it on exit."""
    data_dir = Path(tempfile.mkdtemp(prefix="bench-server-"))
    log_path = data_dir / "server.log"
    cmd = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", "0", "--no-metrics",
           "--http-port", "0", "--data-dir", str(data_dir / "data"), "--device-slots", str(device_slots),
           "--max-lora-rank", str(max_lora_rank), "--max-running", str(max_running), *extra]
    if not quantize:
        cmd.append("--no-quantize")
    if model:
        cmd += ["--model", model]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    target = _wait_for_target(proc, start_timeout_s, log_path)
    drain = threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True)  # keep the pipe empty
    drain.start()
    try:
        yield ServerProcess(target, None, proc, log_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_for_target(proc: subprocess.Popen, timeout_s: float, log_path: Path) -> str:
    found: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            m = _SERVING.search(line + " ")
            if m:
                found.append(m.group(1))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not found:
        proc.kill()
        tail = log_path.read_text()[-2000:] if log_path.exists() else ""
        raise RuntimeError(f"the server did not start within {timeout_s:.0f} s (exit {proc.poll()}):\n{tail}")
    return found[0]


def upload_adapters(target: str, api_key: str | None, adapters: dict[str, Path]) -> float:
    """Upload every PEFT dir through Admin.UploadAdapter; returns the seconds it took."""
    from clients import SwitchboardClient

    start = time.perf_counter()
    with SwitchboardClient(target, api_key=api_key) as client:
        for name, path in adapters.items():
            client.upload_adapter(path, name)
    return time.perf_counter() - start


def drive_requests(target: str, api_key: str | None, requests: list[BenchRequest], new_tokens: int,
                   concurrency: int, warm_up: bool = True) -> PeerResult:
    """Closed loop at `concurrency` streams over gRPC; tokens/s over the whole run (first send to last token)."""
    from clients import AsyncSwitchboardClient

    w = Workload(num_requests=len(requests), output_len=f"fixed:{new_tokens}")
    plan = [PlannedRequest(i, r.adapter, r.token_ids, new_tokens) for i, r in enumerate(requests)]

    async def run():
        client = AsyncSwitchboardClient(target, api_key=api_key)
        try:
            if warm_up:  # one short request per adapter: every adapter read and put in a slot before timing
                names = sorted({r.adapter for r in requests})
                warm = [PlannedRequest(i, n, (1, 2, 3, 4), 1) for i, n in enumerate(names)]
                await run_closed_loop(client, warm, w, concurrency)
            return await run_closed_loop(client, plan, w, concurrency)
        finally:
            closing = client.close()
            if asyncio.iscoroutine(closing):
                await closing

    records, seconds = asyncio.run(run())
    failed = [r for r in records if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0].error}: {failed[0].error_message}")
    res = PeerResult("switchboard server over gRPC", len(records), sum(r.output_tokens for r in records), seconds)
    res.outputs = {requests[i].index: r.output_token_ids for i, r in enumerate(records)}
    return res
