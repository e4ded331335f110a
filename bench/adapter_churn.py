"""Adapter churn: many stored adapters, few device slots; how long does the step loop stall while they load?

    .venv/bin/python -m bench.adapter_churn [--adapters 1000] [--slots 8] [--cycle 200] [--requests 400]
        [--concurrency 16] [--new-tokens 4] [--model DIR] [--device cpu|cuda]

The store is filled with --adapters LoRA adapters (PEFT-made, 10 distinct contents copied; rank 8 on
q_proj/v_proj), the engine and registry open it (every adapter on disk), and --concurrency closed-loop
clients send --requests requests whose adapters cycle through the first --cycle names, so nearly every
request finds its adapter outside the device slots. The engine's step() is timed from outside (an
instance-attribute wrapper): it prints the longest step, the longest gap between two steps while
sequences were running (a stall of the loop), and the pool's counters. --model defaults to a tiny random
2-layer Llama (built in a temp dir); pass a HF dir (e.g. the default model's cache) for real shapes.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from server.adapters.registry import open_registry
from server.adapters.store import AdapterStore
from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams


def fill_store(root: Path, model_dir: Path, n: int, contents: int = 10) -> None:
    from tests.adapter_files import clone_store
    from tests.peft_adapters import AdapterSpec, make_peft_adapter

    store = AdapterStore(root)
    for i in range(contents):
        src = make_peft_adapter(model_dir, AdapterSpec(f"c{i}", "lora", rank=8, seed=i), root.parent / f"src{i}")
        store.put("bench", f"a{i:04d}", src, meta={"kind": "LORA", "rank": 8})
    clone_store(store, "bench", n, contents)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--cycle", type=int, default=200)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="adapter-churn-"))
    try:
        model_dir = args.model
        if model_dir is None:
            from tests.tiny_models import make_tiny_model_dir

            model_dir = make_tiny_model_dir(tmp / "model")
        t0 = time.monotonic()
        fill_store(tmp / "data" / "adapters", model_dir, args.adapters)
        fill_s = time.monotonic() - t0
        engine = Engine.create(ModelConfig(path=str(model_dir), quantize=False, device=args.device), EngineConfig(),
                               AdapterPoolConfig(device_slots=args.slots, max_lora_rank=8))
        t0 = time.monotonic()
        registry = open_registry(tmp / "data", engine.pool)
        open_s = time.monotonic() - t0
        steps: list[tuple[float, float, int]] = []
        plain_step = engine.step

        def timed_step() -> None:
            start = time.monotonic()
            plain_step()
            steps.append((start, time.monotonic(), len(engine.scheduler.running)))

        engine.step = timed_step
        engine.start()
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        counter = iter(range(args.requests))
        lock = threading.Lock()
        failures = []

        def client(_: int) -> None:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                key = registry.resolve("bench", f"a{i % args.cycle:04d}").pool_key
                handle = engine.submit(GenerationRequest(f"r{i}", (11, 42, 97, 5), params, adapter=key))
                while not (event := handle.get(timeout=600)).finished:
                    pass
                if event.error:
                    failures.append(event.error)

        started = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(client, range(args.concurrency)))
        elapsed = time.monotonic() - started
        engine.shutdown()
        stats = engine.pool.stats()
        busy = [s for s in steps if s[2] > 0]
        lengths = sorted(end - start for start, end, _ in busy)
        pauses = sorted(nxt[0] - prev[1] for prev, nxt in zip(steps, steps[1:], strict=False) if prev[2] > 0)
        print(f"model {model_dir} on {args.device}; {args.adapters} adapters stored (filled in {fill_s:.1f} s, "
              f"registry opened in {open_s * 1e3:.0f} ms), {args.slots} device slots, cycling {args.cycle}")
        print(f"{args.requests} requests x {args.new_tokens} tokens, {args.concurrency} concurrent: {elapsed:.2f} s "
              f"({args.requests / elapsed:.1f} req/s), failures {len(failures)}")
        print(f"steps with sequences running: {len(busy)}; step length p50 {lengths[len(lengths) // 2] * 1e3:.2f} ms, "
              f"max {lengths[-1] * 1e3:.2f} ms")
        print(f"longest gap between steps while sequences were running: {pauses[-1] * 1e3:.2f} ms "
              f"(p99 {pauses[int(len(pauses) * 0.99)] * 1e3:.2f} ms)")
        print(f"pool: slot loads {stats.loads}, disk loads {stats.disk_loads}, host copies {stats.host_entries} "
              f"({stats.host_bytes / 2**20:.1f} MiB), longest slot copy (on the loader thread) "
              f"{stats.max_slot_copy_s * 1e3:.2f} ms")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
