"""Composed adapters (kernels/compose.py): a decode step's LoRA work when every sequence composes several adapters.

    .venv/bin/python -m bench compose [--sequences 32] [--adapters 32] [--parts 2] [--rank 16] [--layers 30]
                                      [--repeats 10]

SmolLM2-135M's projection shapes (q/k/v, o, gate/up, down per layer), rank-`rank` adapters in pool-layout tables
(A [slots, rank, in], B [slots, out, rank] fp32), one decode token per sequence, layers cache-cold (each layer its
own tables). Rows, each timed over the whole step (every layer, every group):
  base           the base matmuls alone (dense fp32 x @ W^T)
  single         base + each sequence its own adapter (kernels.lora_apply_group: the plain path)
  composed       base + each sequence `parts` distinct adapters of the `adapters`, random weights (the plain
                 call over no token, then kernels.compose.compose_apply over the sequences x parts pairs)
GB/s is the adapter bytes the row must read (each adapter used in the step read once: the parts' bytes) over the
LoRA time (row minus base). Figures only on quiet cores; a smoke run proves it works.
"""

from __future__ import annotations

import argparse

import torch

import kernels
from bench.kernels import timed
from kernels import build_lora_meta
from kernels.compose import build_compose_meta, compose_apply

HIDDEN, KV, FFN = 576, 192, 1536
KERNELS = kernels.backend("cpu")  # the compiled kernels (or the reference where they cannot be built)
GROUPS = [("qkv", HIDDEN, (HIDDEN, KV, KV)), ("o", HIDDEN, (HIDDEN,)), ("gate_up", HIDDEN, (FFN, FFN)),
          ("down", FFN, (HIDDEN,))]


def _tables(layers: int, adapters: int, rank: int, g: torch.Generator):
    """Per layer and group: (base weights [out, in] each, the group's LoraGroup)."""
    out = []
    for _ in range(layers):
        layer = []
        for _, n_in, outs in GROUPS:
            bases = [torch.randn(n, n_in, generator=g) * 0.02 for n in outs]
            a = [torch.randn(adapters, rank, n_in, generator=g) * 0.02 for _ in outs]
            b = [torch.randn(adapters, n, rank, generator=g) * 0.02 for n in outs]
            layer.append((n_in, bases, KERNELS.lora_group(a, b)))
        out.append(layer)
    return out


def _step(tables, xs, scales, meta, compose) -> None:
    for layer in tables:
        for n_in, bases, group in layer:
            x = xs[n_in]
            ys = [x @ w.t() for w in bases]
            if meta is not None:
                KERNELS.lora_apply_group(x, group, scales, meta, ys)
            if compose is not None:
                compose_apply(x, group, scales, compose, ys, KERNELS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--parts", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    if not 1 <= args.parts <= args.adapters:
        p.error("--parts must be in [1, --adapters]")
    g = torch.Generator().manual_seed(0)
    tables = _tables(args.layers, args.adapters, args.rank, g)
    n = args.sequences
    xs = {HIDDEN: torch.randn(n, HIDDEN, generator=g), FFN: torch.randn(n, FFN, generator=g)}
    scales = torch.ones(args.adapters)
    ranks = [args.rank] * args.adapters
    single_slots = torch.arange(n, dtype=torch.int32) % args.adapters
    single = build_lora_meta(single_slots, ranks)
    pairs = [(i, int(s), float(w)) for i in range(n) for s, w in
             zip(torch.randperm(args.adapters, generator=g)[: args.parts], torch.rand(args.parts, generator=g) * 3 - 1,
                 strict=True)]
    compose = build_compose_meta(pairs, ranks)
    nothing = build_lora_meta(torch.full((n,), -1, dtype=torch.int32), ranks)
    per_adapter = sum(args.rank * (n_in + sum(outs)) * 4 for _, n_in, outs in GROUPS) * args.layers  # bytes

    rows = {"base": (None, None, 0), "single": (single, None, len(set(single_slots.tolist()))),
            "composed": (nothing, compose, len({s for _, s, _ in pairs}))}
    times = {name: timed(lambda m=m, c=c: _step(tables, xs, scales, m, c), args.repeats)
             for name, (m, c, _) in rows.items()}
    print(f"decode step: {n} sequences, {args.adapters} adapters of rank {args.rank}, {args.parts} parts per "
          f"composed sequence, {args.layers} layers, threads {torch.get_num_threads()}")
    print("| row | step (ms) | LoRA (ms) | adapters read | adapter MB | GB/s of the parts' bytes |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (_, _, used) in rows.items():
        lora_s = times[name] - times["base"]
        mb = used * per_adapter / 1e6
        rate = f"{used * per_adapter / lora_s / 1e9:.1f}" if name != "base" and lora_s > 0 else "-"
        print(f"| {name} | {times[name] * 1e3:.2f} | {lora_s * 1e3:.2f} | {used} | {mb:.1f} | {rate} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
