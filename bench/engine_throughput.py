"""Engine throughput on the default model: ours at 1 / 8 / 32 concurrent sequences vs transformers generate.

    .venv/bin/python -m bench.engine_throughput [--new-tokens 32] [--prompt-len 32] [--out bench/RESULTS.md]

Every request generates exactly --new-tokens tokens (EOS ignored) from a --prompt-len token prompt.
Peers, in the same run: transformers `generate` one request at a time, and batched with left padding.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import time
from pathlib import Path

import torch

from server.config import EngineConfig, ModelConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams
from server.model.checkpoint import resolve_model_dir


def make_prompts(tokenizer, n: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    text = " the of and to in is for on with as by at from about time people world"
    words = tokenizer.encode(text, add_special_tokens=False)
    return [[words[i] for i in torch.randint(0, len(words), (prompt_len,), generator=g).tolist()] for _ in range(n)]


def ours(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    handles = [engine.submit(GenerationRequest(f"b{i}-{start}", tuple(p), params)) for i, p in enumerate(prompts)]
    n = sum(len(e.token_ids) for h in handles for e in h)
    return n / (time.perf_counter() - start)


def hf_generate(model, prompts: list[list[int]], new_tokens: int, batch: int, pad_id: int) -> float:
    start = time.perf_counter()
    n = 0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=pad_id)
        n += (out.shape[1] - width) * len(chunk)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--hf-single-requests", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None, help="append the markdown table to this file")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: list[tuple[str, float]] = []
    for quantize in (True, False):
        engine = Engine.create(ModelConfig(quantize=quantize), EngineConfig())
        engine.start()
        label = "NF4" if quantize else "fp32 dense"
        ours(engine, make_prompts(engine.tokenizer, 2, args.prompt_len, seed=99), 4)  # warm-up
        for c in levels:
            tps = ours(engine, make_prompts(engine.tokenizer, c, args.prompt_len, seed=c), args.new_tokens)
            rows.append((f"switchboard engine, {label}, {c} concurrent", tps))
            print(f"{rows[-1][0]:<55} {tps:8.1f} tok/s", flush=True)
        tokenizer = engine.tokenizer
        engine.shutdown()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(None), dtype=torch.float32).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    single = make_prompts(tokenizer, args.hf_single_requests, args.prompt_len, seed=1)
    tps = hf_generate(model, single, args.new_tokens, 1, pad)
    rows.append(("transformers generate fp32, one request at a time", tps))
    print(f"{rows[-1][0]:<55} {rows[-1][1]:8.1f} tok/s", flush=True)
    for c in levels[1:]:
        tps = hf_generate(model, make_prompts(tokenizer, c, args.prompt_len, seed=c), args.new_tokens, c, pad)
        rows.append((f"transformers generate fp32, padded batch of {c}", tps))
        print(f"{rows[-1][0]:<55} {tps:8.1f} tok/s", flush=True)
    table = [
        f"### Engine throughput ({dt.date.today()}, {platform.machine()}, {torch.get_num_threads()} threads, CPU)",
        "",
        f"`.venv/bin/python -m bench.engine_throughput --new-tokens {args.new_tokens} --prompt-len {args.prompt_len}`"
        " (SmolLM2-135M-Instruct, greedy, EOS ignored)",
        "",
        "| setup | tokens/s |",
        "|---|---:|",
        *[f"| {name} | {tps:.1f} |" for name, tps in rows],
        "",
    ]
    print("\n".join(table))
    if args.out:
        with args.out.open("a") as f:
            f.write("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
