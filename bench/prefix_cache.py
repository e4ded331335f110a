"""The prefix cache on a multi-turn chat workload: TTFT per turn and token throughput, cache on vs off.

    .venv/bin/python bench/prefix_cache.py [--conversations 24] [--turns 3] [--system-len 768] [--turn-len 48]
        [--new-tokens 32] [--adapters 4] [--dense] [--out bench/RESULTS.md]
    .venv/bin/python bench/prefix_cache.py --smoke      # tiny random model, tiny workload: proves it runs

Workload (closed loop, in process on one Engine): every conversation starts at once with the same
--system-len token system prompt followed by its own --turn-len token user turn; when a turn's answer
(--new-tokens greedy tokens, EOS ignored) is complete, the conversation sends the next turn: the whole history
(system, every user turn and answer so far) plus a new user turn. Run twice per engine setup: the base model
for every conversation, and conversations spread round-robin over --adapters random LoRA adapters (rank 8,
q/v; each adapter's blocks are its own, so the system prompt is computed once per adapter and tenant).
Each setup runs with the prefix cache on and off on fresh engines. Prints TTFT p50 / p99 per turn (arrival ->
first token, ms) and generated tokens / s over the whole run; the ratio off / on per turn.
A llama.cpp comparison is not part of this script yet.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.config import AdapterPoolConfig, EngineConfig, ModelConfig  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.request import GenerationRequest, RequestHandle, SamplingParams  # noqa: E402


@dataclass
class Conversation:
    adapter: str | None
    user_turns: list[list[int]]
    history: list[int] = field(default_factory=list)  # system + turns + answers so far
    turn: int = 0
    handle: RequestHandle | None = None
    answer: list[int] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)  # per turn


@dataclass
class RunResult:
    label: str
    ttft_ms: list[list[float]]  # per turn, every conversation's TTFT
    tokens_per_s: float
    cached_share: float  # prompt tokens served from the cache / all prompt tokens


def workload(args, vocab: int, seed: int = 0) -> tuple[list[int], list[list[list[int]]]]:
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(0, vocab, (args.system_len,), generator=g).tolist()
    turns = [[torch.randint(0, vocab, (args.turn_len,), generator=g).tolist() for _ in range(args.turns)]
             for _ in range(args.conversations)]
    return system, turns


def run(engine: Engine, system: list[int], turns: list[list[list[int]]], adapters: list[str], new_tokens: int,
        label: str) -> RunResult:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    convs = [Conversation(adapters[i % len(adapters)] if adapters else None, t, list(system))
             for i, t in enumerate(turns)]

    def send(i: int, c: Conversation) -> None:
        c.history += c.user_turns[c.turn]
        c.answer = []
        req = GenerationRequest(f"{label}-{i}-{c.turn}", tuple(c.history), params, adapter=c.adapter)
        c.handle = engine.submit(req)

    start = time.perf_counter()
    generated = prompt_tokens = cached = 0
    for i, c in enumerate(convs):
        send(i, c)
    live = set(range(len(convs)))
    while live:
        for i in sorted(live):
            c = convs[i]
            try:
                event = c.handle.get(timeout=0.001)
            except Exception:  # queue.Empty: nothing from this one yet
                continue
            if event.ttft_s is not None:
                c.ttft_s.append(event.ttft_s)
            c.answer += event.token_ids
            if not event.finished:
                continue
            if event.error:
                raise RuntimeError(f"{label}: conversation {i} failed: {event.error}")
            generated += len(c.answer)
            prompt_tokens += event.prompt_tokens
            cached += event.cached_prompt_tokens
            c.history += c.answer
            c.turn += 1
            if c.turn < len(c.user_turns):
                send(i, c)
            else:
                live.discard(i)
    elapsed = time.perf_counter() - start
    per_turn = [[c.ttft_s[t] * 1e3 for c in convs] for t in range(len(turns[0]))]
    return RunResult(label, per_turn, generated / elapsed, cached / max(1, prompt_tokens))


def random_adapters(model_dir: Path, n: int, root: Path) -> dict[str, Path]:
    from tests.peft_adapters import AdapterSpec, make_peft_adapter

    return {f"lora{i}": make_peft_adapter(model_dir, AdapterSpec(f"lora{i}", "lora", rank=8, seed=100 + i),
                                          root / f"lora{i}") for i in range(n)}


def engine_for(model_path: str | None, quantize: bool, cache: bool, adapters: dict[str, Path]) -> Engine:
    engine = Engine.create(ModelConfig(path=model_path, quantize=quantize),
                           EngineConfig(prefix_cache=cache, max_waiting=1024),
                           AdapterPoolConfig(device_slots=max(2, len(adapters)), max_lora_rank=8))
    for name, path in adapters.items():
        engine.pool.register(name, path)
    engine.start()
    warm = SamplingParams(max_new_tokens=2, ignore_eos=True)  # kernels built, adapters in their slots
    for i, name in enumerate([None, *adapters]):  # tokens of no workload prompt: nothing cached for it
        for event in engine.submit(GenerationRequest(f"warm-{i}", (1, 2, 3, 4, 5, 6, 7), warm, adapter=name)):
            if event.error:
                raise RuntimeError(f"warm-up failed: {event.error}")
    return engine


def report(rows: list[tuple[str, RunResult, RunResult]]) -> list[str]:
    lines = ["| setup | turn | TTFT p50 on / off (ms) | TTFT p99 on / off (ms) | p50 off/on |",
             "|---|---|---|---|---|"]
    for setup, on, off in rows:
        for t, (a, b) in enumerate(zip(on.ttft_ms, off.ttft_ms, strict=True)):
            p50 = (np.percentile(a, 50), np.percentile(b, 50))
            p99 = (np.percentile(a, 99), np.percentile(b, 99))
            lines.append(f"| {setup} | {t + 1} | {p50[0]:.0f} / {p50[1]:.0f} | {p99[0]:.0f} / {p99[1]:.0f} | "
                         f"{p50[1] / max(p50[0], 1e-9):.1f}x |")
    lines += ["", "| setup | tokens/s on | tokens/s off | on/off | prompt tokens from the cache (on) |",
              "|---|---|---|---|---|"]
    for setup, on, off in rows:
        lines.append(f"| {setup} | {on.tokens_per_s:.1f} | {off.tokens_per_s:.1f} | "
                     f"{on.tokens_per_s / max(off.tokens_per_s, 1e-9):.2f}x | {on.cached_share:.0%} |")
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2-135M)")
    ap.add_argument("--conversations", type=int, default=24)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--system-len", type=int, default=768)
    ap.add_argument("--turn-len", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=4, help="LoRA adapters of the adapter setup (0: base only)")
    ap.add_argument("--dense", action="store_true", help="fp32 dense weights instead of NF4")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model and a tiny workload")
    ap.add_argument("--out", type=Path, default=None, help="append the markdown tables to this file")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="prefix-cache-bench-"))
    model_path = args.model
    if args.smoke:
        from tests.tiny_models import make_tiny_model_dir

        model_path = str(make_tiny_model_dir(tmp / "tiny"))
        args.conversations, args.turns, args.system_len, args.turn_len = 3, 2, 40, 8
        args.new_tokens, args.adapters = 4, min(args.adapters, 2)
    from server.model.checkpoint import resolve_model_dir

    model_dir = Path(model_path) if model_path else resolve_model_dir(None)
    adapters = random_adapters(model_dir, args.adapters, tmp / "adapters") if args.adapters else {}
    setups = [("base", {})] + ([(f"{len(adapters)} LoRA adapters", adapters)] if adapters else [])
    rows = []
    for setup, used in setups:
        results = {}
        for cache in (True, False):
            engine = engine_for(model_path, not args.dense, cache, used)
            try:
                system, turns = workload(args, engine.args.vocab_size)
                results[cache] = run(engine, system, turns, list(used), args.new_tokens,
                                     f"{setup}-{'on' if cache else 'off'}")
            finally:
                engine.shutdown()
            print(f"{setup}, cache {'on' if cache else 'off'}: {results[cache].tokens_per_s:.1f} tok/s", flush=True)
        rows.append((setup, results[True], results[False]))
    lines = report(rows)
    print("\n".join(lines))
    if args.out is not None:
        with open(args.out, "a") as f:
            f.write("\n".join(["", f"### bench/prefix_cache.py {' '.join(argv or sys.argv[1:])}", "", *lines, ""]))
    return lines


if __name__ == "__main__":
    main()
