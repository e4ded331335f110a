"""What the gRPC layer costs: the same requests straight into the engine vs through the server + client.

`python bench/grpc_overhead.py [--model DIR] [--requests N] [--concurrency C] [--tokens T]`
Default model: the embedded SmolLM2-135M, dense fp32 (--tiny: a 2-layer random model, which makes the
per-request overhead stand out). Prints per-request latency (sequential, 1 token and T tokens) and
C concurrent streams' throughput, each for the engine directly, unary gRPC and streaming gRPC.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path


def _engine_once(engine, ids: list[int], tokens: int) -> None:
    from server.engine.request import GenerationRequest, SamplingParams

    handle = engine.submit(GenerationRequest(uuid.uuid4().hex, tuple(ids), SamplingParams(tokens, ignore_eos=True)))
    for _ in handle:
        pass


def _timed(fn, n: int) -> float:
    """Median seconds of n calls (after one warm-up)."""
    fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _concurrent(fn, c: int) -> float:
    threads = [threading.Thread(target=fn) for _ in range(c)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer random model (tests/tiny_models.py)")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args(argv)

    from server.config import EngineConfig
    from tests.server_utils import running_server

    model = args.model
    if args.tiny:
        from tests.tiny_models import make_tiny_model_dir

        model = str(make_tiny_model_dir(Path(tempfile.mkdtemp(prefix="tiny-")) / "m"))
    if model is None:
        from server.model.checkpoint import resolve_model_dir

        model = str(resolve_model_dir(None))
    ids = list(range(100, 116))
    n, t, c = args.requests, args.tokens, args.concurrency
    rows = []
    with running_server(model, engine_cfg=EngineConfig(max_running=max(64, c))) as s, s.client(None) as client:
        eng = s.engine
        for tokens in (1, t):
            direct = _timed(lambda tokens=tokens: _engine_once(eng, ids, tokens), n)
            unary = _timed(lambda tokens=tokens: client.generate(token_ids=ids, max_new_tokens=tokens,
                                                                  ignore_eos=True), n)
            stream = _timed(lambda tokens=tokens: list(client.stream(token_ids=ids, max_new_tokens=tokens,
                                                                       ignore_eos=True)), n)
            rows.append((f"sequential, {tokens} token(s), median ms/request", direct * 1e3, unary * 1e3,
                         stream * 1e3))
        direct = _concurrent(lambda: _engine_once(eng, ids, t), c)
        unary = _concurrent(lambda: client.generate(token_ids=ids, max_new_tokens=t, ignore_eos=True), c)
        stream = _concurrent(lambda: list(client.stream(token_ids=ids, max_new_tokens=t, ignore_eos=True)), c)
        rows.append((f"{c} concurrent x {t} tokens, tokens/s", c * t / direct, c * t / unary, c * t / stream))
    print(f"model: {model} (dense fp32, CPU)\n")
    print("| measure | engine direct | gRPC unary | gRPC stream |")
    print("|---|---|---|---|")
    for name, *vals in rows:
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
