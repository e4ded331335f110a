"""n choices of one prompt (Engine.submit_group): the prompt is computed once and its KV blocks shared; every
choice equals a single request with the same seed (the oracle), the cache is whole again afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams
from tests.adapter_files import peft_adapter
from tests.engine_utils import collect


def make_engine(model_dir: Path, **cfg) -> Engine:
    engine = Engine.create(ModelConfig(path=str(model_dir), quantize=False), EngineConfig(kv_block_size=8, **cfg),
                           AdapterPoolConfig(device_slots=4, max_lora_rank=8, max_virtual_tokens=8))
    engine.start()
    return engine


def params(seed: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=7, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True)


def singles(engine: Engine, ids: tuple[int, ...], seeds: list[int], adapter: str | None) -> list[list[int]]:
    out = []
    for s in seeds:  # one at a time: nothing shared
        out.append(collect(engine.submit(GenerationRequest(f"single-{s}-{adapter}", ids, params(s),
                                                           adapter=adapter))).token_ids)
    return out


def group(engine: Engine, ids: tuple[int, ...], seeds: list[int], adapter: str | None, tag: str) -> list[list[int]]:
    reqs = [GenerationRequest(f"{tag}-{i}", ids, params(s), adapter=adapter) for i, s in enumerate(seeds)]
    return [collect(h).token_ids for h in engine.submit_group(reqs)]


def counting_computed_tokens(engine: Engine) -> list[int]:
    """Tokens computed per step (prompt + decodes), recorded by wrapping the runner."""
    counted: list[int] = []
    run = engine.runner.run

    def counting(scheduled):
        counted.append(sum(n for _, n in scheduled))
        return run(scheduled)

    engine.runner.run = counting
    return counted


@pytest.mark.parametrize("prompt_len", [16, 13])  # a whole number of blocks, and a partial tail block to copy
def test_siblings_share_the_prompt_and_equal_single_requests(tiny_llama_dir: Path, prompt_len: int) -> None:
    engine = make_engine(tiny_llama_dir, prefix_cache=False)  # counts the group's prompt in full (singles ran it)
    try:
        seed = int(torch.randint(0, 10**6, ()))
        ids = tuple(torch.randint(0, 49152, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist())
        seeds = [seed + i for i in range(4)]
        want = singles(engine, ids, seeds, None)
        counted = counting_computed_tokens(engine)
        got = group(engine, ids, seeds, None, f"g{prompt_len}")
        assert got == want, f"seed {seed}"
        assert len({tuple(t) for t in got}) > 1, f"seed {seed}: the choices should differ"
        # the prompt once, then 6 decode tokens for each of the 4 choices (the 7th token ends each)
        assert sum(counted) == prompt_len + 4 * 6, (counted, seed)
        assert engine.kv.used_blocks == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize("kind", ["lora", "prefix", "prompt"])
def test_siblings_with_an_adapter_equal_single_requests(tiny_llama_dir: Path, kind: str) -> None:
    engine = make_engine(tiny_llama_dir)
    try:
        engine.pool.register(kind, peft_adapter(tiny_llama_dir, kind, rank=4, seed=31))
        seed = int(torch.randint(0, 10**6, ()))
        ids = tuple(range(100 + seed % 50, 111 + seed % 50))
        seeds = [seed, seed + 1, seed + 2]
        assert group(engine, ids, seeds, kind, f"a-{kind}") == singles(engine, ids, seeds, kind), f"seed {seed}"
        assert engine.kv.used_blocks == 0
    finally:
        engine.shutdown()


def test_siblings_that_cannot_fork_compute_the_prompt_themselves(tiny_llama_dir: Path) -> None:
    """One running sequence at a time: no sibling can join the parent's batch, each is queued ordinarily."""
    engine = make_engine(tiny_llama_dir, max_running=1)
    try:
        ids = tuple(range(200, 213))
        counted = counting_computed_tokens(engine)
        got = group(engine, ids, [5, 6, 7], None, "nofork")
        assert sum(counted) == 3 * (13 + 6) - 2 * 8  # the later two find the first's full block (8) cached
        engine.runner.run = type(engine.runner).run.__get__(engine.runner)
        assert got == singles(engine, ids, [5, 6, 7], None)
        assert engine.kv.used_blocks == 0
    finally:
        engine.shutdown()


def test_aborting_a_parent_before_its_prompt_runs_leaves_its_siblings_served(tiny_llama_dir: Path) -> None:
    engine = make_engine(tiny_llama_dir)
    try:
        ids = tuple(range(300, 309))
        want = singles(engine, ids, [8, 9], None)
        with engine._lock:  # hold the step loop so the parent is still queued when it is aborted
            handles = engine.submit_group([GenerationRequest(f"ab-{i}", ids, params(s)) for i, s in
                                           enumerate([7, 8, 9])])
            engine.abort("ab-0")
        results = [collect(h) for h in handles]
        assert results[0].finish_reason.value == "abort"
        assert [r.token_ids for r in results[1:]] == want
        assert engine.kv.used_blocks == 0
    finally:
        engine.shutdown()
