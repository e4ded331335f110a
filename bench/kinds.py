"""Decode-step cost of the adapter kinds of issue 14: 32 sequences on 32 distinct adapters of one kind vs base.

    .venv/bin/python -m bench.kinds [--repeats 12] [--rounds 3] [--threads N] [--nf4] [--kinds lora dora ...]
                                    [--out FILE]

Default model (fp32 dense, or NF4 with --nf4), 32 sequences of 32 prompt tokens, pure decode steps timed (median
wall and CPU ms), base and kind measured in one engine the way bench/kernels.py measures LoRA (bench/decode_step.py:
a warm-up block each, then interleaved blocks), on its pool configuration. Adapters (random, written to a
temporary directory in each kind's file format, loaded by the pool):
  lora        rank 16 on the seven projections (the reference row)
  dora        rank 16 on the seven projections + magnitudes (LoRA + one gain multiply per projection)
  bitfit      bias deltas on the seven projections
  houlsby     bottleneck after attention and feed-forward, reduction factor 16 (size 36 on SmolLM2-135M)
  pfeiffer    bottleneck after the feed-forward, reduction factor 16
  longlora    LoRA rank 16 on the seven projections + every RMSNorm weight + RoPE linear factor 2 (the embedding
              table left to the base: the per-token norm and RoPE cost on top of LoRA)
  longlora-embed  the same + its own embedding table (PEFT modules_to_save embed_tokens: vocab x hidden per slot,
              113 MB fp32 on SmolLM2-135M, so 32 slots hold 3.6 GB)
  mixed       the LoRA family in one step: lora, dora and longlora adapters in turn (11 / 11 / 10 sequences),
              one table set and one fused base + LoRA call per projection group (target: within 1.15x of base)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.decode_step import interleaved
from server.model.args import PROJECTIONS, ModelArgs

KINDS = ("lora", "dora", "bitfit", "houlsby", "pfeiffer", "longlora", "longlora-embed", "mixed")
MIXED = ("lora", "dora", "longlora")  # the kinds of the mixed row, adapter i of the step being MIXED[i % 3]
_PARENT = {m: "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for m in PROJECTIONS}


def write_adapter(kind: str, args: ModelArgs, out: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True)
    t: dict[str, torch.Tensor] = {}
    if kind in ("lora", "dora", "longlora", "longlora-embed"):
        r = 16
        for layer in range(args.num_layers):
            for m in PROJECTIONS:
                n_in, n_out = args.projection_shape(m)
                p = f"base_model.model.model.layers.{layer}.{_PARENT[m]}.{m}"
                t[f"{p}.lora_A.weight"] = 0.02 * torch.randn(r, n_in, generator=g)
                t[f"{p}.lora_B.weight"] = 0.02 * torch.randn(n_out, r, generator=g)
                if kind == "dora":
                    t[f"{p}.lora_magnitude_vector"] = 1.0 + 0.1 * torch.rand(n_out, generator=g)
        cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 32, "target_modules": list(PROJECTIONS),
               "use_dora": kind == "dora"}
        if kind.startswith("longlora"):
            h = args.hidden_size
            for layer in range(args.num_layers):
                for norm in ("input_layernorm", "post_attention_layernorm"):
                    t[f"base_model.model.model.layers.{layer}.{norm}.weight"] = 1 + 0.05 * torch.randn(h, generator=g)
            t["base_model.model.model.norm.weight"] = 1 + 0.05 * torch.randn(h, generator=g)
            saved = ["input_layernorm", "post_attention_layernorm", "norm"]
            if kind == "longlora-embed":
                t["base_model.model.model.embed_tokens.weight"] = 0.02 * torch.randn(args.vocab_size, h, generator=g)
                saved.append("embed_tokens")
            cfg.update(modules_to_save=saved, rope_scaling={"rope_type": "linear", "factor": 2.0})
        name = "adapter_model.safetensors"
    elif kind == "bitfit":
        for layer in range(args.num_layers):
            for m in PROJECTIONS:
                t[f"model.layers.{layer}.{_PARENT[m]}.{m}.bias"] = 0.02 * torch.randn(args.projection_shape(m)[1],
                                                                                      generator=g)
        cfg = {"peft_type": "BITFIT", "target_modules": list(PROJECTIONS)}
        name = "adapter_model.safetensors"
    else:
        h, size = args.hidden_size, args.hidden_size // 16
        blocks = ("attention_adapters", "output_adapters") if kind == "houlsby" else ("output_adapters",)
        for layer in range(args.num_layers):
            for loc in blocks:
                p = f"model.layers.{layer}.{loc}.adapters.bench"
                t[f"{p}.adapter_down.0.weight"] = 0.02 * torch.randn(size, h, generator=g)
                t[f"{p}.adapter_down.0.bias"] = torch.zeros(size)
                t[f"{p}.adapter_up.weight"] = 0.02 * torch.randn(h, size, generator=g)
                t[f"{p}.adapter_up.bias"] = torch.zeros(h)
        inner = {"architecture": "bottleneck", "mh_adapter": kind == "houlsby", "output_adapter": True,
                 "reduction_factor": 16, "non_linearity": "swish" if kind == "houlsby" else "relu",
                 "original_ln_before": kind == "pfeiffer", "original_ln_after": True, "residual_before_ln": True,
                 "scaling": 1.0}
        cfg = {"config": inner, "name": "bench", "hidden_size": h, "model_type": "llama"}
        name = "adapter.safetensors"
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(t, out / name)
    return out


def pool_config(max_lora_rank: int):
    """bench/kernels.py's pool (32 slots, max rank 64 by default), with room for the kinds' extras: 32 LongLoRA
    embedding tables need ~3.6 GB of host cache (the bottleneck, 576 // 16 = 36 wide, fits the default 64)."""
    from server.config import AdapterPoolConfig

    return AdapterPoolConfig(device_slots=32, max_lora_rank=max_lora_rank, host_cache_bytes=8 << 30)


def rows(kinds: list[str], steps: int, rounds: int, quantize: bool, max_lora_rank: int = 64):
    """One engine per kind (only that kind's tables are allocated); base and kind interleaved in each
    (bench/decode_step.py, as bench/kernels.py measures LoRA)."""
    import gc

    from server.config import EngineConfig, ModelConfig
    from server.engine.engine import Engine

    mode = "NF4" if quantize else "fp32 dense"
    yield (f"| decode step, 32 sequences, default model {mode}, {torch.get_num_threads()} threads "
           f"| load (1 min) | base wall ms | kind wall ms | kind CPU ms | wall vs base | CPU vs base |")
    yield "|---|---:|---:|---:|---:|---:|---:|"
    with tempfile.TemporaryDirectory(prefix="bench-kinds-") as tmp:
        for row, kind in enumerate(kinds):  # a kind may be listed twice (a repeat in a fresh engine)
            engine = Engine.create(ModelConfig(quantize=quantize), EngineConfig(), pool_config(max_lora_rank))
            names = []
            for i in range(32):
                file_kind = MIXED[i % len(MIXED)] if kind == "mixed" else kind
                path = write_adapter(file_kind, engine.args, Path(tmp) / f"{row}-{kind}-{i}", seed=i)
                engine.pool.register(f"{kind}-{i}", path)
                names.append(f"{kind}-{i}")
            t = interleaved(engine, {"base": [None] * 32, kind: names}, steps, rounds)
            base, k = t["base"], t[kind]
            yield (f"| 32 distinct {kind} | {os.getloadavg()[0]:.1f} | {base.wall_ms:.1f} | {k.wall_ms:.1f} "
                   f"| {k.cpu_ms:.1f} | {k.wall_ms / base.wall_ms:.2f}x | {k.cpu_ms / base.cpu_ms:.2f}x |")
            del engine
            gc.collect()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=12, help="timed decode steps per variant (base, kind)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved blocks per variant the steps are split into")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--nf4", action="store_true", help="the NF4 base (default: fp32 dense)")
    ap.add_argument("--max-lora-rank", type=int, default=64, help="the pool's LoRA rank bound (tables pad to it)")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [f"### Adapter kinds, decode step ({dt.date.today()})", "",
             f"`python -m bench.kinds {' '.join(sys.argv[1:] if argv is None else argv)}`", ""]
    print("\n".join(lines), flush=True)
    for row in rows(args.kinds, args.repeats, args.rounds, args.nf4, args.max_lora_rank):
        print(row, flush=True)
        lines.append(row)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
