"""Cost of structured output (issue 32): the decode step with half the rows JSON-constrained vs none, and
the compile time per schema, cold and cached.

    .venv/bin/python -m bench structured [--model DIR] [--steps 24] [--rounds 3] [--threads N] [--smoke]

32 sequences of 32 prompt tokens on 32 distinct random LoRA adapters (rank 16 on the seven projections,
bench/kinds.py's), default model fp32 dense unless --model; pure decode steps timed (bench/decode_step.py's
way: a warm-up block per variant, then interleaved blocks; only steps that ran all 32 sequences as one decode
token each count). Variant `none`: no constraint; `half-json`: sequences 0, 2, 4, ... held to an open-ended
JSON schema (an array of objects, so they rarely complete inside a block). Compile: each schema of SCHEMAS
compiled by a fresh GrammarCompiler (cold: the tokenizer view built first, reported apart) and again (cached).
llama.cpp's server with its JSON-schema grammar is the reference (--llama-server or $SWITCHBOARD_LLAMA_SERVER;
bench/structured_llama.py): the same prompts, no constraint vs half the rows constrained, on its GGUF.
--smoke: a few steps, to prove the script runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.decode_step import PROMPT
from bench.kinds import pool_config, write_adapter

OPEN_SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}}}
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"anyOf": [
        {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                                          "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
         "required": ["sku", "qty"]},
        {"type": "null"}]}}, "status": {"enum": ["new", "paid", "shipped", "void"]}}, "required": ["items"]},
    OPEN_SCHEMA,
    {"type": "object", "properties": {f"field_{i}": {"type": ["string", "number", "null"]} for i in range(60)}},
]


def decode_block(engine, adapters: list[str], constraint, new_tokens: int, label: str) -> list[float]:
    """Wall seconds of every step that ran all sequences as one decode token each."""
    from server.engine.request import GenerationRequest, SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, temperature=1.0, seed=1)
    handles = engine.submit_group([
        GenerationRequest(f"{label}-{i}", PROMPT, params, adapter=a, constraint=constraint if i % 2 == 0 else None)
        for i, a in enumerate(adapters)])
    walls: list[float] = []
    while any(not h.done for h in handles):
        engine.take_submitted()
        before = engine.steps
        t0 = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t0
        stats = engine.stats()
        if engine.steps > before and stats.batch_size == len(adapters) == stats.batch_tokens:
            walls.append(wall)
        for h in handles:
            with contextlib.suppress(queue.Empty):
                while not h.done:
                    h.get(timeout=0)
    return walls


def step_rows(engine, names: list[str], steps: int, rounds: int) -> list[str]:
    from server.structured.constraint import Constraint

    constraint = Constraint.json_schema(OPEN_SCHEMA)
    engine.grammars.compile(constraint)
    variants = {"none": None, "half-json": constraint}
    for name, c in variants.items():
        decode_block(engine, names, c, 4, f"warm-{name}")
    walls: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, c in variants.items():
            walls[name] += decode_block(engine, names, c, -(-steps // rounds) + 1, f"{name}-{r}")
    base = statistics.median(walls["none"]) if walls["none"] else float("nan")
    out = ["| decode step, 32 sequences on 32 LoRAs | timed steps | median wall ms | vs none |", "|---|---:|---:|---:|"]
    for name, w in walls.items():
        med = statistics.median(w) * 1e3 if w else float("nan")
        out.append(f"| {name} | {len(w)} | {med:.1f} | {med / (base * 1e3):.2f}x |")
    return out


def compile_rows(tokenizer, vocab: int) -> list[str]:
    from server.structured.compiler import GrammarCompiler
    from server.structured.constraint import Constraint

    gc = GrammarCompiler(tokenizer, vocab)
    t0 = time.perf_counter()
    gc.ll_tokenizer  # noqa: B018 - the tokenizer view, built once per engine
    out = [f"tokenizer view built once: {(time.perf_counter() - t0) * 1e3:.1f} ms", "",
           "| schema | JSON chars | cold compile ms | cached ms |", "|---|---:|---:|---:|"]
    for i, schema in enumerate(SCHEMAS):
        c = Constraint.json_schema(schema)
        t0 = time.perf_counter()
        gc.compile(c)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        gc.compile(c)
        cached = time.perf_counter() - t0
        out.append(f"| {i} | {len(c.spec)} | {cold * 1e3:.2f} | {cached * 1e3:.3f} |")
    gc.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory (default: the embedded SmolLM2-135M)")
    ap.add_argument("--steps", type=int, default=24, help="timed decode steps per variant")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="2 rounds of 2 steps: proves the script runs (no figures)")
    ap.add_argument("--llama-server", default=os.environ.get("SWITCHBOARD_LLAMA_SERVER"),
                    help="llama.cpp's llama-server binary: its JSON-schema grammar's cost as the reference (skipped "
                         "without it; bench/structured_llama.py)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.steps, args.rounds = 4, 2
    from server.config import EngineConfig, ModelConfig
    from server.engine.engine import Engine

    engine = Engine.create(ModelConfig(path=args.model, quantize=False), EngineConfig(), pool_config(64))
    with tempfile.TemporaryDirectory(prefix="bench-structured-") as tmp:
        names = []
        for i in range(32):
            engine.pool.register(f"lora-{i}", write_adapter("lora", engine.args, Path(tmp) / f"lora-{i}", seed=i))
            names.append(f"lora-{i}")
        print(f"{torch.get_num_threads()} threads{' (smoke run: not figures)' if args.smoke else ''}")
        print("\n".join(compile_rows(engine.tokenizer, engine.args.vocab_size)))
        print()
        print("\n".join(step_rows(engine, names, args.steps, args.rounds)))
    engine.grammars.close()
    if args.llama_server:
        from bench.prefix_cache import default_gguf
        from bench.structured_llama import llama_rows

        print()
        print("\n".join(llama_rows(args.llama_server, str(default_gguf()), PROMPT, OPEN_SCHEMA,
                                   torch.get_num_threads(), rounds=1 if args.smoke else 3)))


if __name__ == "__main__":
    main()
