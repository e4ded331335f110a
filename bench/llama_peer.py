"""llama.cpp's server as a peer of bench/prefix_cache.py: the same multi-turn chat workload, token for token.

`LlamaServer(binary, gguf, ...)` starts `llama-server` on 127.0.0.1 (a free port) with its prompt cache on,
`--parallel` slots sharing `--ctx-size`; `run_chats(server, system, turns, new_tokens)` drives it closed loop
like bench/prefix_cache.py's `run`: every conversation at once, each sends its next turn (the whole history:
system prompt, user turns and answers so far, as token ids) when the previous answer is complete. Requests go
to its native `/completion` endpoint with the prompt as token ids (so the prompts equal ours exactly; the chat
endpoint would re-tokenize text), `cache_prompt: true`, greedy, EOS ignored, streamed: TTFT = request sent ->
first streamed token. Its weights are the GGUF's (Q4_1 for the embedded SmolLM2-135M), not ours.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path


class LlamaServer:
    def __init__(self, binary: str | Path, gguf: str | Path, parallel: int = 8, ctx_size: int = 16384,
                 threads: int = 2, startup_s: float = 120.0) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
                    "-np", str(parallel), "-c", str(ctx_size), "--threads", str(threads), "--cache-prompt"]
        # its log goes to a file: a pipe nobody reads fills up (64 KiB) and blocks the server mid-run
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in close(), after the process
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}): {self.log.read()[-2000:]}")
            try:
                if self._get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        self.close()
        raise RuntimeError(f"llama-server did not answer /health within {startup_s:.0f} s")

    def _get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def complete(self, prompt: list[int], new_tokens: int, extra: dict | None = None
                 ) -> tuple[float, list[int], int]:
        """One streamed greedy completion: (TTFT seconds, the token ids generated, prompt tokens it took from its
        cache). `extra`: more /completion fields (e.g. `json_schema`)."""
        body = json.dumps({"prompt": prompt, "n_predict": new_tokens, "cache_prompt": True, "ignore_eos": True,
                           "temperature": 0, "stream": True, "return_tokens": True, **(extra or {})})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        sent = time.perf_counter()
        ttft, generated, cached = None, [], 0
        try:
            conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status != 200:
                raise RuntimeError(f"llama-server: HTTP {r.status}: {r.read()[:500]!r}")
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                tokens = event.get("tokens") or []
                if tokens and ttft is None:
                    ttft = time.perf_counter() - sent
                generated += tokens
                if event.get("stop"):
                    timings = event.get("timings") or {}
                    cached = int(timings.get("cache_n", 0))
                    break
        finally:
            conn.close()
        return ttft or 0.0, generated, cached

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run_chats(server: LlamaServer, system: list[int], turns: list[list[list[int]]], new_tokens: int
              ) -> tuple[list[list[float]], float, float]:
    """(TTFT ms per turn per conversation, generated tokens / s, prompt tokens from its cache / prompt tokens)."""
    ttft = [[0.0] * len(turns) for _ in range(len(turns[0]))]
    totals = [0, 0, 0]  # generated, prompt, cached
    lock = threading.Lock()
    errors: list[BaseException] = []

    def conversation(i: int) -> None:
        history = list(system)
        try:
            for t, user in enumerate(turns[i]):
                history += user
                first, answer, cached = server.complete(history, new_tokens)
                ttft[t][i] = first * 1e3
                with lock:
                    totals[0] += len(answer)
                    totals[1] += len(history)
                    totals[2] += cached
                history += answer  # the next turn resends the answer, as ours does
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    start = time.perf_counter()
    threads = [threading.Thread(target=conversation, args=(i,), daemon=True) for i in range(len(turns))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError(f"llama-server chat workload failed: {errors[0]!r}") from errors[0]
    elapsed = time.perf_counter() - start
    return ttft, totals[0] / elapsed, totals[2] / max(1, totals[1])
