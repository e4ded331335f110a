"""Helpers of the prefix-cache tests: engines with the cache on and off, requests served in waves, and the
oracle (the same waves on an engine with the cache switched off)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
from server.engine.engine import Engine
from server.engine.request import FinishReason, GenerationRequest, RequestHandle, SamplingParams

BLOCK = 4  # small blocks: prompts of a few dozen tokens span many of them


@dataclass
class Done:
    tokens: list[int]
    cached: int  # prompt tokens served from the cache
    prompt_tokens: int
    finish_reason: FinishReason | None
    error: str | None


def make_engine(model_dir: Path, *, prefix_cache: bool = True, quantize: bool = False, start: bool = True,
                slots: int = 4, **cfg) -> Engine:
    engine = Engine.create(ModelConfig(path=str(model_dir), quantize=quantize),
                           EngineConfig(kv_block_size=BLOCK, prefix_cache=prefix_cache, **cfg),
                           AdapterPoolConfig(device_slots=slots, max_lora_rank=16, max_virtual_tokens=16))
    if start:
        engine.start()
    return engine


def count_computed(engine: Engine) -> None:
    """Keep `engine.computed_tokens`: context entries computed by the model so far (wraps the runner)."""
    run = engine.runner.run
    engine.computed_tokens = 0

    def counting(scheduled):
        engine.computed_tokens += sum(n for _, n in scheduled)
        return run(scheduled)

    engine.runner.run = counting


def finish(handle: RequestHandle, timeout: float = 120.0) -> Done:
    tokens: list[int] = []
    while True:
        event = handle.get(timeout=timeout)
        tokens += event.token_ids
        if event.finished:
            return Done(tokens, event.cached_prompt_tokens, event.prompt_tokens, event.finish_reason, event.error)


def greedy(n: int = 5) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


Wave = list[list[GenerationRequest]]  # groups submitted together (a group of several = n choices of one prompt)
Waves = list[Wave | Callable[[list[list["Done"]]], Wave]]  # a callable builds its wave from the earlier results


def serve(engine: Engine, waves: Waves) -> list[list[Done]]:
    """Each wave's groups submitted at once, collected, then the next wave (so later waves find earlier ones'
    blocks cached). Results per wave, flattened in submission order."""
    out = []
    for wave in waves:
        if callable(wave):
            wave = wave(out)
        handles = [h for group in wave for h in engine.submit_group(group)]
        out.append([finish(h) for h in handles])
    return out


def assert_cache_changes_nothing(model_dir: Path, waves: Waves, quantize: bool = False,
                                 adapters: dict[str, Path] | None = None,
                                 inspect: Callable[[Engine, bool], None] | None = None, **cfg) -> list[list[Done]]:
    """The waves' outputs with the cache on equal those with it off (token for token); returns the cache-on
    results. Both engines end with no block held and the allocator's invariants intact; `inspect(engine, on)`
    looks at each engine before it shuts down."""
    results = []
    for on in (True, False):
        engine = make_engine(model_dir, prefix_cache=on, quantize=quantize, slots=len(adapters or {}) + 2, **cfg)
        try:
            for name, path in (adapters or {}).items():
                engine.pool.register(name, path)
            count_computed(engine)
            results.append(serve(engine, waves))
            assert engine.kv.used_blocks == 0
            assert engine.kv.blocks.problems([]) == []
            if not on:
                assert engine.stats().prefix.cached_blocks == 0
            if inspect is not None:
                inspect(engine, on)
        finally:
            engine.shutdown()
    cached, plain = results
    for w, (got, want) in enumerate(zip(cached, plain, strict=True)):
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert a.error is None and b.error is None, (a.error, b.error)
            assert a.tokens == b.tokens, f"wave {w} request {i}: cache on {a.tokens} != off {b.tokens}"
            assert b.cached == 0
    return cached


def lcp(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    return len(os.path.commonprefix([a, b]))


def cacheable(prompt: list[int], contexts: list[list[int]], supplied: int = 0) -> int:
    """Prompt tokens the cache can serve from blocks computed over `contexts` (the same chain: tenant, salt,
    adapter): whole blocks of the longest common prefix, never the last entry. `supplied`: adapter entries
    (prefix K/V, virtual tokens) before the prompt, the same in every context."""
    if not contexts:
        return 0
    best = max(lcp(prompt, c) for c in contexts)
    blocks = min((supplied + best) // BLOCK, (supplied + len(prompt) - 1) // BLOCK)
    return max(0, blocks * BLOCK - supplied)
