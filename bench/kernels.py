"""LoRA kernel benchmark: shrink+expand time, and the decode step with 32 LoRA adapters vs the base model.

    .venv/bin/python -m bench.kernels [--repeats 20] [--rounds 3] [--threads N] [--skip-ops] [--skip-engine] [--nf4]
                                      [--lora-dtype auto|float32|bfloat16] [--out FILE]

Part 1 (op level): tokens x hidden 576 -> out 1536 (SmolLM2's gate_proj), rank 16, 32 adapters, popularity
distinct / uniform / zipf:1.5 / skewed / identical. Compares our paths (on CPU the torch reference and the
compiled CPU kernel, on CUDA Triton), a loop over tokens, and gather+bmm; reports achieved GB/s of
adapter-weight + activation traffic against the measured copy bandwidth. On CPU also the LoRA work of a
whole decode step (7 projections x 30 layers, cache-cold), with and without fused q/k/v and gate/up
shrinks, and through lora_apply on the pool's layout (max rank 64, rank-major B); and one layer's
paged attention (kernels/attention.py) against today's padded gather + SDPA.
Part 2 (engine): one decode step of 32 sequences on the default model (fp32 dense, or NF4 with --nf4), each with its
own rank-16 LoRA on all seven projections, vs the same 32 sequences on the base model, timed as bench/kinds.py times
every kind (bench/decode_step.py: a warm-up block each, then interleaved blocks).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import kernels
from bench.decode_step import interleaved
from bench.workloads import random_lora, sample_adapter_ids
from kernels.cpu import cpu_expand, cpu_shrink, cpu_shrink_many
from kernels.meta import build_lora_meta
from kernels.reference import expand_reference, shrink_reference


def lora_shrink(x, a_stack, meta):
    return kernels.backend(x.device).lora_shrink(x, a_stack, meta, None)


def lora_expand(t, b_stack, scales, meta, y):
    return kernels.backend(t.device).lora_expand(t, b_stack, scales, meta, y)


def lora_apply(x, a_stacks, b_stacks, scales, meta, ys):
    return kernels.backend(x.device).lora_apply(x, a_stacks, b_stacks, scales, meta, ys)


def timed(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def copy_bandwidth(device: str) -> float:
    x = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    sec = timed(lambda: y.copy_(x), 5)
    return 2 * x.numel() / sec / 1e9


def op_rows(device: str, repeats: int):
    """Yield table rows as they are measured (op level, gate_proj-shaped, rank 16, 32 adapters)."""
    n_in, n_out, rank, n_adapters = 576, 1536, 16, 32
    a = torch.randn(n_adapters, rank, n_in, device=device)
    b = torch.randn(n_adapters, n_out, rank, device=device)
    scales = torch.ones(n_adapters, device=device)
    yield f"measured copy bandwidth: {copy_bandwidth(device):.1f} GB/s; load average {load_average()}"
    yield ""
    cuda = device.startswith("cuda")
    paths = {"ours (Triton)": (lora_shrink, lora_expand)} if cuda else {
        "reference": (shrink_reference, expand_reference), "cpu kernel": (cpu_shrink, cpu_expand)}
    names = list(paths)
    yield ("| shape | popularity | " + " | ".join(f"{n} (ms) | GB/s" for n in names)
           + " | token loop (ms) | gather+bmm (ms) |")
    yield "|---|---|" + "---:|---:|" * len(names) + "---:|---:|"
    rng = np.random.default_rng(0)
    for label, tokens in [("decode 1", 1), ("decode 8", 8), ("decode 32", 32), ("decode 128", 128),
                          ("decode 256", 256), ("prefill 4x128", 512)]:
        for pop in ("distinct", "uniform", "zipf:1.5", "skewed", "identical"):
            if label.startswith("prefill"):  # 4 sequences of 128 tokens, one adapter each
                ids = np.repeat(sample_adapter_ids(pop, 4, n_adapters, rng), 128)
            else:
                ids = sample_adapter_ids(pop, tokens, n_adapters, rng)
            ids = np.sort(ids, kind="stable")  # the engine's runner lays tokens out grouped by slot
            slots = torch.tensor(ids, dtype=torch.int32, device=device)
            x = torch.randn(tokens, n_in, device=device)
            y = torch.zeros(tokens, n_out, device=device)

            meta = build_lora_meta(slots, [rank] * n_adapters)  # built once per step, shared by every layer

            def token_loop(x=x, y=y, ids=ids):
                for i, s in enumerate(ids.tolist()):
                    y[i] += (x[i] @ a[s].t()) @ b[s].t()

            def gather_bmm(x=x, y=y, slots=slots):
                idx = slots.long()
                t = torch.bmm(x[:, None, :], a[idx].transpose(1, 2))
                y.add_(torch.bmm(t, b[idx].transpose(1, 2))[:, 0])

            distinct = len(set(ids.tolist()))
            moved = 4 * (distinct * rank * (n_in + n_out) + tokens * (n_in + 2 * n_out))
            cells = []
            for shrink, expand in paths.values():
                sec = timed(lambda x=x, y=y, meta=meta, shrink=shrink, expand=expand:
                            expand(shrink(x, a, meta), b, scales, meta, y), repeats)
                cells.append(f"{sec * 1e3:.3f} | {moved / sec / 1e9:.1f}")
            loop = f"{timed(token_loop, max(1, repeats // 4)) * 1e3:.3f}" if tokens <= 32 else "-"
            yield f"| {label} | {pop} | {' | '.join(cells)} | {loop} | {timed(gather_bmm, repeats) * 1e3:.3f} |"


# SmolLM2-135M's seven projections (in, out) and its 30 layers: the LoRA work of one decode step
STEP_SHAPES = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576),
               "gate": (576, 1536), "up": (576, 1536), "down": (1536, 576)}


def step_rows(repeats: int, layers: int = 30, rank: int = 16, n_adapters: int = 32, tokens: int = 32):
    """The LoRA work of a whole decode step, cache-cold: 32 tokens on 32 distinct rank-16 adapters, all seven
    projections of every layer, each layer's tables a strided view of [slots, layers, rank, in] as in the pool."""
    tables = {n: (torch.randn(n_adapters, layers, rank, i) * 0.02, torch.randn(n_adapters, layers, o, rank) * 0.02)
              for n, (i, o) in STEP_SHAPES.items()}
    scales = torch.ones(n_adapters)
    meta = build_lora_meta(torch.arange(tokens, dtype=torch.int32) % n_adapters, [rank] * n_adapters)
    xs = {i: torch.randn(tokens, i) for i in (576, 1536)}
    ys = {o: torch.zeros(tokens, o) for o in (192, 576, 1536)}
    weight_bytes = sum(a.numel() + b.numel() for a, b in tables.values()) * 4 * min(tokens, n_adapters) / n_adapters

    # the pool's layout: A [slots, layers, 64, in], B rank-major [slots, layers, 64, out] seen as [.., out, 64]
    pool = {n: (torch.randn(n_adapters, layers, 64, i) * 0.02, (torch.randn(n_adapters, layers, 64, o) * 0.02)
                .transpose(2, 3)) for n, (i, o) in STEP_SHAPES.items()}
    groups = [("q", "k", "v"), ("o",), ("gate", "up"), ("down",)]

    def run_apply():
        for layer in range(layers):
            for group in groups:
                x = xs[STEP_SHAPES[group[0]][0]]
                lora_apply(x, [pool[n][0][:, layer] for n in group], [pool[n][1][:, layer] for n in group], scales,
                           meta, [ys[STEP_SHAPES[n][1]] for n in group])

    def run(shrink, expand, fused: bool):
        if shrink is None:
            return run_apply()
        for layer in range(layers):
            for group in groups if fused else [(n,) for n in STEP_SHAPES]:
                x = xs[STEP_SHAPES[group[0]][0]]
                if fused and len(group) > 1:
                    ts = cpu_shrink_many(x, [tables[n][0][:, layer] for n in group], meta)
                else:
                    ts = [shrink(x, tables[n][0][:, layer], meta) for n in group]
                for n, t in zip(group, ts, strict=True):
                    expand(t, tables[n][1][:, layer], scales, meta, ys[STEP_SHAPES[n][1]])

    yield (f"| LoRA work of one decode step ({tokens} tokens, {n_adapters} distinct rank-{rank}, 7 projections x "
           f"{layers} layers, {weight_bytes / 1e6:.0f} MB of adapter weights), {torch.get_num_threads()} threads "
           "| wall ms/step | GB/s | CPU ms/step |")
    yield "|---|---:|---:|---:|"
    variants = [("reference (segment loop)", shrink_reference, expand_reference, False),
                ("cpu kernel, 7 shrinks per layer", cpu_shrink, cpu_expand, False),
                ("cpu kernel, q/k/v and gate/up shrinks fused", cpu_shrink, cpu_expand, True),
                ("lora_apply per group on the pool layout (max rank 64, rank-major B)", None, None, True)]
    for label, shrink, expand, fused in variants:
        run(shrink, expand, fused)
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            run(shrink, expand, fused)
        sec, cpu_sec = (time.perf_counter() - w0) / repeats, (time.process_time() - c0) / repeats
        yield f"| {label} | {sec * 1e3:.1f} | {weight_bytes / sec / 1e9:.1f} | {cpu_sec * 1e3:.1f} |"


def attention_rows(repeats: int, heads: int = 9, kv_heads: int = 3, dim: int = 64, block_size: int = 16):
    """One layer's attention (SmolLM2-135M's heads) over the paged cache: the compiled kernel vs the torch reference."""
    from kernels.attention import build_paged_attention_meta, paged_attention_reference
    from kernels.attention import paged_attention_kernel as paged_attention

    yield (f"| attention, one layer ({heads} heads, {kv_heads} kv heads, dim {dim}, block {block_size}), "
           f"{torch.get_num_threads()} threads | paged kernel (ms) | K/V GB/s | torch reference (ms) | ratio |")
    yield "|---|---:|---:|---:|---:|"
    cases = [("decode 32 x 512", [(1, 512)] * 32), ("decode 32 x 2048", [(1, 2048)] * 32),
             ("decode 8 x 4096", [(1, 4096)] * 8), ("decode 1 x 4096 + 31 x 64", [(1, 4096)] + [(1, 64)] * 31),
             ("prefill 1 x 512", [(512, 512)]), ("prefill chunk 256 of 2048 + 31 decodes x 64",
                                                 [(256, 2048)] + [(1, 64)] * 31)]
    g = torch.Generator().manual_seed(0)
    for label, seqs in cases:
        need = [-(-ctx // block_size) for _, ctx in seqs]
        order = torch.randperm(sum(need), generator=g).tolist()  # blocks scattered over the cache
        tables, used = [], 0
        for n in need:
            tables.append(order[used : used + n] + [-1] * (max(need) - n))
            used += n
        k_cache = torch.randn(sum(need) * block_size, kv_heads, dim, generator=g)
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(sum(q for q, _ in seqs), heads, dim, generator=g)
        meta = build_paged_attention_meta([q for q, _ in seqs], [c for _, c in seqs], tables, block_size)
        t_new = timed(lambda q=q, k=k_cache, v=v_cache, meta=meta: paged_attention(q, k, v, meta, dim**-0.5), repeats)
        t_old = timed(lambda q=q, k=k_cache, v=v_cache, meta=meta: paged_attention_reference(q, k, v, meta, dim**-0.5),
                      max(1, repeats // 4))
        kv_bytes = 2 * sum(c for _, c in seqs) * kv_heads * dim * 4
        yield (f"| {label} | {t_new * 1e3:.2f} | {kv_bytes / t_new / 1e9:.1f} | {t_old * 1e3:.2f} | "
               f"{t_old / t_new:.1f}x |")


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def engine_rows(repeats: int, rounds: int, quantize: bool, lora_dtype: str = "auto", two_calls: bool = True):
    """Decode steps of 32 sequences on the default model: base vs 32 distinct rank-16 LoRAs (all seven modules),
    interleaved after a warm-up (bench/decode_step.py); two_calls adds the 32 LoRAs with each projection group's
    base matmuls and LoRA kernel as two calls in turn (kernels.projection's fused call switched off)."""
    from server.adapters.kinds.lora import LoraStep
    from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
    from server.engine.engine import Engine

    engine = Engine.create(ModelConfig(quantize=quantize), EngineConfig(),
                           AdapterPoolConfig(device_slots=32, max_lora_rank=64, lora_dtype=lora_dtype))
    for i in range(32):
        engine.pool.register(f"a{i}", random_lora(engine.args, 16, i))
    mode = "NF4" if quantize else "fp32 dense"
    yield f"| decode step, 32 sequences, default model {mode}, {torch.get_num_threads()} threads | wall ms | CPU ms |"
    yield "|---|---:|---:|"
    lora = "32 distinct rank-16 LoRA (7 modules)" + ("" if lora_dtype == "auto" else f", {lora_dtype} tables")
    variants = {"base model": [None] * 32, lora: [f"a{i}" for i in range(32)]}
    separate = f"{lora}, base and LoRA as two calls"
    if two_calls:
        variants[separate] = variants[lora]

    @contextlib.contextmanager
    def without_fused_call():
        fused = LoraStep.project_with_base
        LoraStep.project_with_base = lambda self, *args: None
        try:
            yield
        finally:
            LoraStep.project_with_base = fused

    t = interleaved(engine, variants, repeats, rounds, contexts={separate: without_fused_call})
    for label, times in t.items():
        yield f"| {label} | {times.wall_ms:.1f} | {times.cpu_ms:.1f} |"
    base, ours = t["base model"], t[lora]
    yield f"| ratio LoRA / base | {ours.wall_ms / base.wall_ms:.2f}x | {ours.cpu_ms / base.cpu_ms:.2f}x |"
    if two_calls:
        sep = t[separate]
        ratios = f"{sep.wall_ms / base.wall_ms:.2f}x | {sep.cpu_ms / base.cpu_ms:.2f}x"
        yield f"| ratio LoRA as two calls / base | {ratios} |"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="engine part: interleaved base / LoRA blocks the --repeats decode steps are split into")
    ap.add_argument("--skip-ops", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--nf4", action="store_true", help="the engine part on the NF4 base (default: fp32 dense)")
    ap.add_argument("--lora-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="the engine part's LoRA slot tables (AdapterPoolConfig.lora_dtype)")
    ap.add_argument("--no-two-calls", action="store_true",
                    help="engine part: skip the row with the fused base + LoRA call switched off")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = "Triton SGMV" if args.device.startswith("cuda") else "the compiled CPU kernel"
    title = f"### LoRA kernels ({dt.date.today()}, {args.device}, {torch.get_num_threads()} threads; ours = {path})"
    lines = [title, "", f"`python -m bench.kernels {' '.join(sys.argv[1:] if argv is None else argv)}`", ""]
    print("\n".join(lines), flush=True)
    parts = [] if args.skip_ops else [op_rows(args.device, args.repeats)]
    if not args.skip_ops and not args.device.startswith("cuda"):
        parts.append(step_rows(max(3, args.repeats // 4)))
        parts.append(attention_rows(max(3, args.repeats // 4)))
    if not args.skip_engine:
        parts.append(engine_rows(args.repeats, args.rounds, args.nf4, args.lora_dtype, not args.no_two_calls))
    for part in parts:
        for row in part:
            print(row, flush=True)
            lines.append(row)
        lines.append("")
        print(flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
