"""Long contexts in CPU time: our engine's steps vs transformers batched `generate`, one thread, same process.

    .venv/bin/python -m bench.long_context_cpu [--length 4096] [--batch 8] [--new-tokens 32] [--budget 2048]

A check that survives loaded cores (bench/long_context.py wants quiet ones): torch runs on one thread, the
engine is stepped from this thread (no step-loop thread), and both sides are timed with `time.thread_time()`,
so another job's share of the cores does not count. Prints ours / theirs in CPU seconds, and our prefill
(steps that compute prompt tokens) and decode steps with the attention share of each.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.engine_throughput import make_prompts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--budget", type=int, default=None, help="EngineConfig.max_batch_tokens (default: its default)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    import server.model.llama as llama
    from server.config import EngineConfig, ModelConfig
    from server.engine.engine import Engine
    from server.engine.request import GenerationRequest, SamplingParams
    from server.model.checkpoint import resolve_model_dir

    budget = {} if args.budget is None else {"max_batch_tokens": args.budget}
    blocks = args.batch * -(-(args.length + args.new_tokens) // 16) + 64
    engine = Engine.create(ModelConfig(quantize=False), EngineConfig(kv_blocks=blocks, **budget))
    attention_s = [0.0]
    paged = llama.paged_attention

    def timed(*a):
        start = time.thread_time()
        out = paged(*a)
        attention_s[0] += time.thread_time() - start
        return out

    llama.paged_attention = timed
    prompts = make_prompts(engine.tokenizer, args.batch, args.length, seed=args.length)
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.submit(GenerationRequest(f"cpu-{i}", tuple(p), params))
    engine.take_submitted()
    phases = {"prefill": [0, 0.0, 0.0], "decode": [0, 0.0, 0.0]}  # steps, CPU s, attention CPU s
    while engine.scheduler.has_work():
        attention_s[0] = 0.0
        start = time.thread_time()
        engine.step()
        seqs, tokens = engine._last_batch
        phase = phases["decode" if tokens == seqs else "prefill"]
        phase[0] += 1
        phase[1] += time.thread_time() - start
        phase[2] += attention_s[0]
    llama.paged_attention = paged
    ours = sum(p[1] for p in phases.values())
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(None), dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    start = time.thread_time()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                       min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    theirs = time.thread_time() - start
    print(f"{args.batch} x ({args.length} + {args.new_tokens}), 1 thread: ours {ours:.1f} CPU s, transformers "
          f"{theirs:.1f} CPU s, ours/theirs speed {theirs / ours:.2f}x")
    for name, (steps, cpu, attn) in phases.items():
        print(f"  ours {name}: {steps} steps, {cpu:.1f} CPU s, attention {attn:.1f} s ({attn / max(cpu, 1e-9):.0%})")


if __name__ == "__main__":
    main()
