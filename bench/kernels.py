"""LoRA kernel benchmark: shrink+expand time, and the decode step with 32 LoRA adapters vs the base model.

    .venv/bin/python bench/kernels.py [--repeats 20] [--skip-engine] [--out bench/RESULTS.md]

Part 1 (op level): tokens x hidden 576 -> out 1536 (SmolLM2's gate_proj), rank 16, 32 adapters, popularity
distinct / uniform / zipf:1.5 / identical. Compares our path (the reference on CPU, Triton on CUDA),
a loop over tokens, and gather+bmm; reports achieved GB/s of adapter-weight + activation traffic against
the measured copy bandwidth. Part 2 (engine): one decode step of 32 sequences on the default model (NF4),
each with its own rank-16 LoRA on all seven projections, vs the same 32 sequences on the base model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import sample_adapter_ids  # noqa: E402
from kernels import lora_expand, lora_shrink  # noqa: E402
from kernels.meta import build_lora_meta  # noqa: E402


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


def op_rows(device: str, repeats: int) -> list[str]:
    n_in, n_out, rank, n_adapters = 576, 1536, 16, 32
    a = torch.randn(n_adapters, rank, n_in, device=device)
    b = torch.randn(n_adapters, n_out, rank, device=device)
    scales = torch.ones(n_adapters, device=device)
    bw = copy_bandwidth(device)
    header = "| shape | popularity | ours (ms) | GB/s | token loop (ms) | gather+bmm (ms) |"
    rows = [f"measured copy bandwidth: {bw:.1f} GB/s", "", header, "|---|---|---:|---:|---:|---:|"]
    rng = np.random.default_rng(0)
    for label, tokens in [("decode 1", 1), ("decode 8", 8), ("decode 32", 32), ("decode 128", 128),
                          ("decode 256", 256), ("prefill 4x128", 512)]:
        for pop in ("distinct", "uniform", "zipf:1.5", "identical"):
            if label.startswith("prefill"):  # 4 sequences of 128 tokens, one adapter each
                ids = np.repeat(sample_adapter_ids(pop, 4, n_adapters, rng), 128)
            else:
                ids = sample_adapter_ids(pop, tokens, n_adapters, rng)
            slots = torch.tensor(ids, dtype=torch.int32, device=device)
            x = torch.randn(tokens, n_in, device=device)
            y = torch.zeros(tokens, n_out, device=device)

            def ours(x=x, y=y, slots=slots):
                meta = build_lora_meta(slots)
                lora_expand(lora_shrink(x, a, meta), b, scales, meta, y)

            def token_loop(x=x, y=y, ids=ids):
                for i, s in enumerate(ids.tolist()):
                    y[i] += (x[i] @ a[s].t()) @ b[s].t()

            def gather_bmm(x=x, y=y, slots=slots):
                idx = slots.long()
                t = torch.bmm(x[:, None, :], a[idx].transpose(1, 2))
                y.add_(torch.bmm(t, b[idx].transpose(1, 2))[:, 0])

            t_ours = timed(ours, repeats)
            distinct = len(set(ids.tolist()))
            moved = 4 * (distinct * rank * (n_in + n_out) + tokens * (n_in + 2 * n_out))
            loop_ms = timed(token_loop, max(1, repeats // 4)) * 1e3 if tokens <= 256 else float("nan")
            rows.append(f"| {label} | {pop} | {t_ours * 1e3:.3f} | {moved / t_ours / 1e9:.1f} | {loop_ms:.3f} | "
                        f"{timed(gather_bmm, repeats) * 1e3:.3f} |")
    return rows


def engine_rows(repeats: int) -> list[str]:
    from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
    from server.engine.engine import Engine
    from server.engine.request import GenerationRequest, SamplingParams
    from tests.peft_adapters import ALL_PROJ, AdapterSpec, make_peft_adapter

    engine = Engine.create(ModelConfig(), EngineConfig(), AdapterPoolConfig(device_slots=32, max_lora_rank=16))
    import tempfile

    from server.model.checkpoint import resolve_model_dir

    tmp = Path(tempfile.mkdtemp())
    base_dir = resolve_model_dir(None)
    spec0 = AdapterSpec("a0", "lora", rank=16, alpha=32, targets=ALL_PROJ, seed=0)
    src = make_peft_adapter(base_dir, spec0, tmp / "a0")
    from server.adapters.peft_format import read_adapter

    w = read_adapter(src, engine.args, 16, 128)
    for i in range(32):  # 32 distinct adapters: the same shapes, different random values
        g = torch.Generator().manual_seed(i)
        a = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in w.lora.a.items()}
        b = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in w.lora.b.items()}
        from dataclasses import replace

        engine.pool.register(f"a{i}", replace(w, lora=replace(w.lora, a=a, b=b)))
    step_times: dict[str, float] = {}
    engine.on_logits = None
    for label, use in (("base model", False), ("32 distinct rank-16 LoRA", True)):
        params = SamplingParams(max_new_tokens=repeats + 2, ignore_eos=True)
        times: list[float] = []
        handles = [engine.submit(GenerationRequest(f"{label}-{i}", tuple(range(100, 132)), params,
                                                   adapter=f"a{i}" if use else None)) for i in range(32)]
        engine.step()  # prefill (engine thread not started: steps driven here, timed one by one)
        while engine.scheduler.has_work():
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        for h in handles:
            list(h)
        step_times[label] = float(np.median(times))
    ratio = step_times["32 distinct rank-16 LoRA"] / step_times["base model"]
    return ["| decode step, 32 sequences, default model NF4 | median ms |", "|---|---:|",
            *[f"| {k} | {v * 1e3:.1f} |" for k, v in step_times.items()], f"| ratio | {ratio:.2f}x |"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    path = "Triton SGMV" if args.device.startswith("cuda") else "torch reference (CPU path)"
    title = f"### LoRA kernels ({dt.date.today()}, {args.device}, {torch.get_num_threads()} threads; ours = {path})"
    command = f"`.venv/bin/python bench/kernels.py --repeats {args.repeats}`"
    lines = [title, "", command, "", *op_rows(args.device, args.repeats)]
    if not args.skip_engine:
        lines += ["", *engine_rows(args.repeats)]
    print("\n".join(lines))
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
