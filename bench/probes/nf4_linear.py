"""Projections on CPU: NF4 through bitsandbytes' dequantize-then-matmul vs our fused kernel, and dense fp32 through
torch's F.linear vs our dense kernel (kernels/linear.py).

    .venv/bin/python -m bench.nf4_linear [--tokens 1 8 32 128 512] [--repeats 7] [--threads N]

Every projection of one decode (or prefill) step of the default model's shapes (30 layers x q, k, v, o,
gate, up, down: 106M weights), random weights quantized by bitsandbytes, M tokens of random activations.
The four paths run round-robin, `--repeats` times; the table prints each path's median ms per step and
the achieved GB/s of weight traffic (4-bit codes + absmax for NF4, fp32 for dense).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import kernels
from kernels.linear import dense_linear, nf4_linear
from server.model.quant import NF4Linear

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # [out, in]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = [NF4Linear(torch.randn(o, i) * 0.02, None, torch.float32, False) for _ in range(args.layers)
              for o, i in SHAPES]
    dense = [layer.dense_weight() for layer in layers]
    nf4_bytes = sum(layer.nbytes() for layer in layers)
    dense_bytes = sum(w.numel() * 4 for w in dense)

    reference = kernels.backend("cpu", "torch")

    def bnb(xs):  # NF4Linear's bitsandbytes path (the torch backend's): dequantize, then F.linear
        for layer in layers:
            reference.nf4_linear(xs[layer.in_features], layer.nf4_weights(), layer.bias, layer.dense_weight)

    def fused(xs):  # the kernel itself at every size (the layer routes calls above FUSED_MAX_TOKENS to bnb)
        for layer in layers:
            state = layer.quant_state
            nf4_linear(xs[layer.in_features], layer.packed, state.absmax, state.code, state.blocksize,
                       layer.out_features)

    def dense_fp32(xs):
        for layer, w in zip(layers, dense, strict=True):
            F.linear(xs[layer.in_features], w)

    def dense_ours(xs):
        for layer, w in zip(layers, dense, strict=True):
            dense_linear(xs[layer.in_features], w)

    print(f"{len(layers)} projections ({sum(w.numel() for w in dense) / 1e6:.0f}M weights), "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print("| tokens | NF4 bitsandbytes ms | NF4 fused ms | bnb / fused | dense F.linear ms | dense ours ms "
          "| F.linear / ours | fused GB/s | dense ours GB/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in args.tokens:
        xs = {576: torch.randn(m, 576), 1536: torch.randn(m, 1536)}
        paths = (("bnb", bnb), ("fused", fused), ("dense", dense_fp32), ("ours", dense_ours))
        times: dict[str, list[float]] = {name: [] for name, _ in paths}
        for _, fn in paths:  # warm-up
            fn(xs)
        for _ in range(args.repeats):
            for name, fn in paths:
                t0 = time.perf_counter()
                fn(xs)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {m} | {med['bnb'] * 1e3:.1f} | {med['fused'] * 1e3:.1f} | {med['bnb'] / med['fused']:.2f}x "
              f"| {med['dense'] * 1e3:.1f} | {med['ours'] * 1e3:.1f} | {med['dense'] / med['ours']:.2f}x "
              f"| {nf4_bytes / med['fused'] / 1e9:.1f} | {dense_bytes / med['ours'] / 1e9:.1f} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
