"""The compiled pointwise kernels (kernels/pointwise.py: RMSNorm, rotary + KV write) against their torch references,
side by side in one engine: decode steps of 32 sequences, base and 32 distinct rank-16 LoRAs, blocks alternating
between the two paths (the order flipped every round) so that a change of load lands on both.

    .venv/bin/python -m bench.pointwise_ab [--rounds 6] [--nf4] [--threads 2]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from bench.decode_step import decode_block
from bench.workloads import random_lora


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=7, help="new tokens per sequence per block (6 timed steps)")
    ap.add_argument("--nf4", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    cli = ap.parse_args(argv)
    torch.set_num_threads(cli.threads)
    import kernels.pointwise as pointwise
    from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
    from server.engine.engine import Engine

    engine = Engine.create(ModelConfig(quantize=cli.nf4), EngineConfig(),
                           AdapterPoolConfig(device_slots=32, max_lora_rank=64))
    for i in range(32):
        engine.pool.register(f"a{i}", random_lora(engine.args, 16, i))
    compiled = pointwise._lib
    paths = {"compiled": compiled, "torch": lambda: None}
    variants = {"base": [None] * 32, "32 LoRA": [f"a{i}" for i in range(32)]}
    for name, adapters in variants.items():
        decode_block(engine, adapters, 4, f"warm-{name}")
    start = os.getloadavg()
    walls: dict[tuple[str, str], list[float]] = {(v, p): [] for v in variants for p in paths}
    for r in range(cli.rounds):
        for name, adapters in variants.items():
            for path in (("compiled", "torch") if r % 2 == 0 else ("torch", "compiled")):
                pointwise._lib = paths[path]
                walls[(name, path)] += decode_block(engine, adapters, cli.tokens, f"{name}-{path}-{r}")[0]
    pointwise._lib = compiled
    mode = "NF4" if cli.nf4 else "fp32 dense"
    print(f"default model {mode}, 32 sequences, {cli.threads} threads, load average "
          f"{start[0]:.2f} -> {os.getloadavg()[0]:.2f}\n")
    print("| step | compiled ms | torch ms | torch / compiled | steps each |\n|---|---:|---:|---:|---:|")
    for name in variants:
        ours, theirs = (float(np.median(walls[(name, p)])) * 1e3 for p in paths)
        print(f"| {name} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.3f}x | {len(walls[(name, 'compiled')])} |")


if __name__ == "__main__":
    main()
