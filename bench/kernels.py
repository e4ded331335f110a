"""LoRA kernel benchmark: shrink+expand time, and the decode step with 32 LoRA adapters vs the base model.

    .venv/bin/python bench/kernels.py [--repeats 20] [--threads N] [--skip-ops] [--skip-engine] [--nf4] [--out FILE]

Part 1 (op level): tokens x hidden 576 -> out 1536 (SmolLM2's gate_proj), rank 16, 32 adapters, popularity
distinct / uniform / zipf:1.5 / identical. Compares our path (the reference on CPU, Triton on CUDA),
a loop over tokens, and gather+bmm; reports achieved GB/s of adapter-weight + activation traffic against
the measured copy bandwidth. Part 2 (engine): one decode step of 32 sequences on the default model (fp32 dense,
or NF4 with --nf4),
each with its own rank-16 LoRA on all seven projections, vs the same 32 sequences on the base model.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import queue
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import random_lora, sample_adapter_ids  # noqa: E402
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


def op_rows(device: str, repeats: int):
    """Yield table rows as they are measured (op level, gate_proj-shaped, rank 16, 32 adapters)."""
    n_in, n_out, rank, n_adapters = 576, 1536, 16, 32
    a = torch.randn(n_adapters, rank, n_in, device=device)
    b = torch.randn(n_adapters, n_out, rank, device=device)
    scales = torch.ones(n_adapters, device=device)
    yield f"measured copy bandwidth: {copy_bandwidth(device):.1f} GB/s"
    yield ""
    yield "| shape | popularity | ours (ms) | GB/s | token loop (ms) | gather+bmm (ms) |"
    yield "|---|---|---:|---:|---:|---:|"
    rng = np.random.default_rng(0)
    for label, tokens in [("decode 1", 1), ("decode 8", 8), ("decode 32", 32), ("decode 128", 128),
                          ("decode 256", 256), ("prefill 4x128", 512)]:
        for pop in ("distinct", "uniform", "zipf:1.5", "identical"):
            if label.startswith("prefill"):  # 4 sequences of 128 tokens, one adapter each
                ids = np.repeat(sample_adapter_ids(pop, 4, n_adapters, rng), 128)
            else:
                ids = sample_adapter_ids(pop, tokens, n_adapters, rng)
            ids = np.sort(ids, kind="stable")  # the engine's runner lays tokens out grouped by slot
            slots = torch.tensor(ids, dtype=torch.int32, device=device)
            x = torch.randn(tokens, n_in, device=device)
            y = torch.zeros(tokens, n_out, device=device)

            meta = build_lora_meta(slots, [rank] * n_adapters)  # built once per step, shared by every layer

            def ours(x=x, y=y, meta=meta):
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
            loop = f"{timed(token_loop, max(1, repeats // 4)) * 1e3:.3f}" if tokens <= 32 else "-"
            yield (f"| {label} | {pop} | {t_ours * 1e3:.3f} | {moved / t_ours / 1e9:.1f} | {loop} | "
                   f"{timed(gather_bmm, repeats) * 1e3:.3f} |")


def engine_rows(repeats: int, quantize: bool):
    """Decode steps of 32 sequences on the default model: base vs 32 distinct rank-16 LoRAs (all seven modules)."""
    from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
    from server.engine.engine import Engine
    from server.engine.request import GenerationRequest, SamplingParams

    engine = Engine.create(ModelConfig(quantize=quantize), EngineConfig(),
                           AdapterPoolConfig(device_slots=32, max_lora_rank=64))
    for i in range(32):
        engine.pool.register(f"a{i}", random_lora(engine.args, 16, i))
    mode = "NF4" if quantize else "fp32 dense"
    yield f"| decode step, 32 sequences, default model {mode}, {torch.get_num_threads()} threads | wall ms | CPU ms |"
    yield "|---|---:|---:|"
    medians: dict[str, tuple[float, float]] = {}
    for label, use in (("base model", False), ("32 distinct rank-16 LoRA (7 modules)", True)):
        params = SamplingParams(max_new_tokens=repeats + 4, ignore_eos=True)
        handles = [engine.submit(GenerationRequest(f"{label}-{i}", tuple(range(100, 132)), params,
                                                   adapter=f"a{i}" if use else None)) for i in range(32)]
        wall: list[float] = []
        cpu: list[float] = []
        while any(not h.done for h in handles):  # engine thread not started: steps are driven and timed here
            engine.take_submitted()
            steps_before = engine.steps
            w0, c0 = time.perf_counter(), time.process_time()
            engine.step()
            stats = engine.stats()  # a step with nothing schedulable (adapters still loading) runs no batch
            if engine.steps > steps_before and stats.batch_size == 32 and stats.batch_tokens == 32:  # pure decode
                wall.append(time.perf_counter() - w0)
                cpu.append(time.process_time() - c0)
            for h in handles:  # consume events so `done` is seen
                with contextlib.suppress(queue.Empty):
                    while not h.done:
                        h.get(timeout=0)
        medians[label] = (float(np.median(wall)), float(np.median(cpu)))
        yield f"| {label} | {medians[label][0] * 1e3:.1f} | {medians[label][1] * 1e3:.1f} |"
    (bw, bc), (lw, lc) = medians.values()
    yield f"| ratio LoRA / base | {lw / bw:.2f}x | {lc / bc:.2f}x |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--skip-ops", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--nf4", action="store_true", help="the engine part on the NF4 base (default: fp32 dense)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = "Triton SGMV" if args.device.startswith("cuda") else "torch reference (CPU path)"
    title = f"### LoRA kernels ({dt.date.today()}, {args.device}, {torch.get_num_threads()} threads; ours = {path})"
    lines = [title, "", f"`.venv/bin/python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}`", ""]
    print("\n".join(lines), flush=True)
    parts = [] if args.skip_ops else [op_rows(args.device, args.repeats)]
    if not args.skip_engine:
        parts.append(engine_rows(args.repeats, args.nf4))
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
