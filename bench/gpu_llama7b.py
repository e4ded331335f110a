"""GPU mode: a Llama-7B-shaped model with random weights, NF4, 32 distinct rank-16 LoRA adapters.

    .venv/bin/python -m bench.gpu_llama7b [--new-tokens 64] [--batch 32] [--out bench/RESULTS.md]

Nothing downloads: the model's tensor names and shapes come from transformers' LlamaConfig (7B: hidden
4096, 32 layers, 32 heads, intermediate 11008) instantiated on the meta device; each tensor is then
drawn at random directly on the GPU as our loader asks for it and NF4-quantized there, layer by layer.
(The vocabulary is the embedded SmolLM2 tokenizer's 49152 instead of 32000, so detokenization works.)
Adapters: 32 random LoRA adapters, rank 16, all seven projections, registered in the engine's pool.

Reports (a) decode tokens/s (mean step time once every sequence has its first token) of `--batch`
sequences with Punica's popularities distinct / uniform / zipf:1.5 / identical over the 32 adapters,
and with no adapter, and (b) the SGMV shrink+expand kernels
on the 7B gate_proj shape (4096 -> 11008, rank 16): time and achieved GB/s against the measured
device copy bandwidth. Without CUDA it prints why it skipped and exits 0. `--smoke` runs the same
code on a tiny Llama shape on whatever device there is (CPU: dense fp32, no kernel rows): a check of
the harness, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from bench.workloads import random_lora, sample_adapter_ids

POPULARITIES = ("distinct", "uniform", "zipf:1.5", "identical")
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)


def random_llama_dir(out: Path, **overrides) -> Path:
    """config.json + the default model's tokenizer + a placeholder safetensors (weights come from RandomCheckpoint)."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from server.model.checkpoint import resolve_model_dir

    tok_dir = resolve_model_dir(None)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      **(LLAMA_7B | overrides))
    cfg.architectures = ["LlamaForCausalLM"]
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for extra in ("generation_config.json",):
        if (tok_dir / extra).exists():
            shutil.copy(tok_dir / extra, out / extra)
    save_file({"placeholder": torch.zeros(1)}, out / "placeholder.safetensors")
    return out


class RandomCheckpoint:
    """Stands in for the loader's safetensors lookup: names/shapes from a meta-device model, values random."""

    def __init__(self, model_dir: Path, device: str = "cuda", dtype: torch.dtype | None = None) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            meta_model = AutoModelForCausalLM.from_config(config)
        self.shapes = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
        self.device = device
        self.dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
        self.generator = torch.Generator(device=device).manual_seed(0)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def get(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise KeyError(f"a Llama model has no tensor {key!r}")
        if key.endswith("norm.weight"):
            return torch.ones(self.shapes[key], device=self.device, dtype=self.dtype)
        return 0.02 * torch.randn(self.shapes[key], device=self.device, dtype=self.dtype, generator=self.generator)


@contextmanager
def random_weights(device: str = "cuda"):
    """While active, the model loader reads RandomCheckpoint instead of the directory's safetensors."""
    with mock.patch("server.model.loader._Checkpoint", lambda model_dir: RandomCheckpoint(model_dir, device)):
        yield


def decode_rows(engine, batch: int, n_adapters: int, prompt_len: int, new_tokens: int) -> list[dict]:
    """Decode tokens/s of `batch` sequences per popularity: from the last first token to the last token."""
    from server.engine.request import GenerationRequest, SamplingParams

    rng = np.random.default_rng(0)
    rows = []
    for pop in ("no adapter", *POPULARITIES):
        ids = sample_adapter_ids(pop, batch, n_adapters, rng) if pop != "no adapter" else [None] * batch
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        handles = [engine.submit(GenerationRequest(f"{pop}-{i}", tuple(range(1000, 1000 + prompt_len)), params,
                                                   adapter=None if a is None else f"a{a}"))
                   for i, a in enumerate(ids)]
        for h in handles:  # every sequence has its first token: prefill (and adapter loads) are behind us
            h.get(timeout=600)
        t0 = time.perf_counter()
        for h in handles:
            for _ in h:
                pass
        seconds = time.perf_counter() - t0
        distinct = len({a for a in ids if a is not None})
        tps = batch * (new_tokens - 1) / seconds
        rows.append({"popularity": pop, "distinct_adapters": distinct, "step_ms": seconds / (new_tokens - 1)
                     * 1e3, "decode_tokens_per_s": tps})
        print(f"decode, batch {batch}, {pop:<10} ({distinct:>2} adapters): {rows[-1]['step_ms']:7.2f} ms/step, "
              f"{tps:8.1f} tok/s", flush=True)
    return rows


def kernel_rows(n_adapters: int, rank: int, repeats: int) -> list[dict]:
    """SGMV shrink+expand on the 7B gate_proj shape, fp16, against the device copy bandwidth."""
    from bench.kernels import copy_bandwidth, lora_expand, lora_shrink, timed
    from kernels.meta import build_lora_meta

    n_in, n_out, dev = LLAMA_7B["hidden_size"], LLAMA_7B["intermediate_size"], "cuda"
    a = torch.randn(n_adapters, rank, n_in, device=dev, dtype=torch.float16)
    b = torch.randn(n_adapters, n_out, rank, device=dev, dtype=torch.float16)
    scales = torch.ones(n_adapters, device=dev)
    bw = copy_bandwidth(dev)
    rng = np.random.default_rng(0)
    rows = []
    for tokens in (1, 8, 32, 128):
        for pop in POPULARITIES:
            ids = sample_adapter_ids(pop, tokens, n_adapters, rng)
            slots = torch.tensor(ids, dtype=torch.int32, device=dev)
            x = torch.randn(tokens, n_in, device=dev, dtype=torch.float16)
            y = torch.zeros(tokens, n_out, device=dev, dtype=torch.float16)

            def op(x=x, y=y, slots=slots):
                meta = build_lora_meta(slots)
                lora_expand(lora_shrink(x, a, meta), b, scales, meta, y)

            def synced(fn=op):
                fn()
                torch.cuda.synchronize()

            sec = timed(synced, repeats)
            distinct = len(set(ids.tolist()))
            moved = 2 * (distinct * rank * (n_in + n_out) + tokens * (n_in + 2 * n_out))
            rows.append({"tokens": tokens, "popularity": pop, "us": sec * 1e6, "GBps": moved / sec / 1e9,
                         "copy_GBps": bw, "fraction_of_copy": moved / sec / 1e9 / bw})
            print(f"kernel {tokens:>4} tokens {pop:<10}: {sec * 1e6:8.1f} us, {moved / sec / 1e9:7.1f} GB/s "
                  f"({moved / sec / 1e9 / bw:.0%} of copy {bw:.0f} GB/s)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_llama7b", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32, help="fewer layers for a quick look (7B has 32)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, any device: checks the harness runs")
    ap.add_argument("--json", type=Path, default=Path("bench/results/gpu_llama7b.json"))
    ap.add_argument("--out", type=Path, default=None, help="append the markdown table here")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu_llama7b: skipped, no CUDA device (torch.cuda.is_available() is False); this benchmark needs a GPU")
        return 0
    device = "cuda" if cuda else "cpu"
    shape = {"num_hidden_layers": args.layers}
    if args.smoke:
        shape = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2}

    from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
    from server.engine.engine import Engine

    model_dir = random_llama_dir(Path(tempfile.mkdtemp(prefix="llama7b-random-")), **shape)
    t0 = time.perf_counter()
    with random_weights(device):
        engine = Engine.create(ModelConfig(path=str(model_dir), quantize=cuda, dtype="float16" if cuda else "float32",
                                           device=device),
                               EngineConfig(max_running=args.batch,  # KV for the batch, 16-token blocks
                                            kv_blocks=args.batch * (-(-(args.prompt_len + args.new_tokens) // 16) + 1)),
                               AdapterPoolConfig(device_slots=args.adapters, max_lora_rank=args.rank))
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"built the random model ({engine.args.num_layers} layers, hidden {engine.args.hidden_size}) in "
          f"{time.perf_counter() - t0:.1f} s on {device_name}; {engine.model.memory_bytes() / 2**30:.2f} GiB",
          flush=True)
    for i in range(args.adapters):
        engine.pool.register(f"a{i}", random_lora(engine.args, args.rank, seed=i, std=0.01))
    engine.start()
    decode = decode_rows(engine, args.batch, args.adapters, args.prompt_len, args.new_tokens)
    engine.shutdown()
    kernels = kernel_rows(args.adapters, args.rank, args.repeats) if cuda else []
    report = {"date": dt.date.today().isoformat(), "device": device_name, "args": vars(args) | {
        "json": str(args.json), "out": str(args.out)}, "decode": decode, "kernels": kernels}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    cmd = " ".join([".venv/bin/python -m bench.gpu_llama7b", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"### Llama-7B-shaped NF4, random weights ({report['date']}, {report['device']})", "", f"`{cmd}`", "",
             "| decode, batch | popularity | adapters in batch | ms/step | tokens/s |", "|---:|---|---:|---:|---:|",
             *[f"| {args.batch} | {r['popularity']} | {r['distinct_adapters']} | {r['step_ms']:.2f} | "
               f"{r['decode_tokens_per_s']:.0f} |" for r in decode],
             "", "| SGMV 4096->11008 r16, tokens | popularity | us | GB/s | of copy bw |", "|---:|---|---:|---:|---:|",
             *[f"| {r['tokens']} | {r['popularity']} | {r['us']:.1f} | {r['GBps']:.0f} | {r['fraction_of_copy']:.0%} |"
               for r in kernels], ""]
    print("\n".join(lines))
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
