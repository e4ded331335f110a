"""A stand-in for llama.cpp's `llama-server` (tests/test_bench_prefix.py): /health, and /completion streaming
`n_predict` tokens (the prompt's length mod 1000, then +1 ...) with `timings.cache_n` = the longest common
prefix with any earlier prompt, as a prompt cache would report. Run as `python tests/fake_llama_server.py
-m MODEL --host H --port P ...` (unknown flags ignored). It logs each prompt to $FAKE_LLAMA_LOG."""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SEEN: list[list[int]] = []


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["prompt"]
        assert all(isinstance(t, int) for t in prompt) and body["cache_prompt"] and body["stream"]
        cached = max((_lcp(prompt, p) for p in SEEN), default=0)
        SEEN.append(prompt)
        with open(os.environ["FAKE_LLAMA_LOG"], "a") as f:
            f.write(json.dumps(prompt) + "\n")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        n = body["n_predict"]
        for i in range(n):
            event = {"tokens": [len(prompt) % 1000 + i], "stop": i == n - 1}
            if i == n - 1:
                event["timings"] = {"cache_n": cached}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()


def _lcp(a: list[int], b: list[int]) -> int:
    return len(os.path.commonprefix([a, b]))


if __name__ == "__main__":
    args = sys.argv[1:]
    host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])
    ThreadingHTTPServer((host, port), Handler).serve_forever()
