"""The prefix cache on the base model: outputs equal the cache switched off (the oracle) for partly cached
prefixes, multi-turn continuations, n choices, chunked prefill and preemption; the cached-token counts are the
whole blocks of the longest prefix computed before; tenants and salts share nothing; the flag turns it off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import generate_latest

from server.engine.request import GenerationRequest, SamplingParams
from server.metrics import ServerMetrics
from server.serve_cli import configs, parse_args
from tests.adapter_files import peft_adapter
from tests.oracle_parity import draw_seed
from tests.prefix_cache_utils import (
    BLOCK,
    Done,
    assert_cache_changes_nothing,
    cacheable,
    finish,
    greedy,
    make_engine,
)


def tokens(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 49152, (n,), generator=g).tolist()


def context(req: GenerationRequest, done: Done) -> list[int]:
    """What a finished request left computed in the cache: its prompt and all but its last token."""
    return list(req.prompt_token_ids) + done.tokens[:-1]


@pytest.mark.parametrize("max_batch_tokens", [7, 2048], ids=["chunked", "whole"])
def test_partly_cached_prefixes_turns_and_choices_equal_the_cache_off(tiny_llama_dir: Path,
                                                                      max_batch_tokens: int) -> None:
    seed = draw_seed()
    g = torch.Generator().manual_seed(seed)
    system = tokens(g, 13)  # 3 full blocks and one entry
    first = [GenerationRequest(f"w1-{i}", tuple(system + tokens(g, 3 + 3 * i)), greedy(6)) for i in range(3)]
    choice_prompt = tuple(system + tokens(g, 4))
    second_fixed = [
        GenerationRequest("w2-system", tuple(system + tokens(g, 7)), greedy()),
        GenerationRequest("w2-same", first[1].prompt_token_ids, greedy()),  # all cached but the last block
        GenerationRequest("w2-part", tuple(system[:6] + tokens(g, 10)), greedy()),  # one block of the system
        GenerationRequest("w2-fresh", tuple(tokens(g, 9)), greedy()),
    ]
    choices = [GenerationRequest(f"w2-n{i}", choice_prompt, SamplingParams(
        max_new_tokens=5, temperature=0.8, seed=seed + i, ignore_eos=True)) for i in range(3)]
    turn2_suffix = tokens(g, 5)

    def second(done: list[list[Done]]) -> list[list[GenerationRequest]]:
        turn2 = GenerationRequest("w2-turn", tuple(context(first[0], done[0][0]) + done[0][0].tokens[-1:]
                                                   + turn2_suffix), greedy())
        return [[r] for r in [*second_fixed, turn2]] + [choices]

    counts = {}

    def inspect(engine, on):
        counts[on] = engine.stats().prefix.tokens.get("local")

    cfg = {"max_batch_tokens": max_batch_tokens, "kv_blocks": 128}
    waves = [[[first[0]]], [[first[1]], [first[2]]], second]
    done = assert_cache_changes_nothing(tiny_llama_dir, waves, inspect=inspect, **cfg)
    done = [done[0] + done[1], done[2]]  # the first turn, the second
    wave2 = second(done)
    reqs2 = [group[0] for group in wave2[:-1]] + choices
    contexts1 = [context(r, d) for r, d in zip(first, done[0], strict=True)]
    contexts2 = [context(r, d) for r, d in zip(reqs2, done[1], strict=True)]
    assert [d.cached for d in done[0]] == [0, 12, 12]  # the first computes the system prompt; the others find it
    for i, (req, d) in enumerate(zip(reqs2, done[1], strict=True)):
        prompt = list(req.prompt_token_ids)
        low = cacheable(prompt, contexts1)
        high = cacheable(prompt, contexts1 + contexts2[:i] + contexts2[i + 1:])
        assert low <= d.cached <= high, (req.request_id, d.cached, low, high, seed)
        assert d.cached % BLOCK == 0 and d.prompt_tokens == len(prompt)
    by_id = {r.request_id: d for r, d in zip(reqs2, done[1], strict=True)}
    assert by_id["w2-same"].cached == 4 * ((len(first[1].prompt_token_ids) - 1) // 4)
    assert by_id["w2-part"].cached == 4 and by_id["w2-fresh"].cached == 0
    assert by_id["w2-turn"].cached >= len(contexts1[0]) // 4 * 4  # the whole first turn, answer included
    assert len({tuple(by_id[f"w2-n{i}"].tokens) for i in range(3)}) > 1, seed  # distinct sampled choices
    # counters: every request's prompt once (the n choices count as one), computed + cached
    siblings = ("w2-n1", "w2-n2")
    counted = [d for r, d in zip(first + reqs2, done[0] + done[1], strict=True) if r.request_id not in siblings]
    assert counts[True] == (sum(d.prompt_tokens - d.cached for d in counted), sum(d.cached for d in counted))
    assert counts[False] == (sum(d.prompt_tokens for d in counted), 0)


def test_preemption_recomputes_through_the_cache_and_changes_nothing(tiny_llama_dir: Path) -> None:
    seed = draw_seed()
    g = torch.Generator().manual_seed(seed)
    system = tokens(g, 9)
    reqs = [GenerationRequest(f"p-{i}", tuple(system + tokens(g, 1 + i % 5)), greedy(18)) for i in range(10)]
    stats = {}

    def inspect(engine, on):
        stats[on] = (engine.scheduler.preemptions, engine.computed_tokens)

    done = assert_cache_changes_nothing(tiny_llama_dir, [[[r] for r in reqs]], inspect=inspect, kv_blocks=22,
                                        max_batch_tokens=64)
    assert stats[True][0] > 0 and stats[False][0] > 0, (stats, seed)  # the budget forced preemptions
    assert stats[True][1] < stats[False][1], (stats, seed)  # the shared prefix and recomputes came from the cache
    assert all(d.finish_reason.value == "length" for d in done[0])


def test_tenants_and_salts_share_nothing_and_the_counters_show_it(tiny_llama_dir: Path) -> None:
    engine = make_engine(tiny_llama_dir)
    try:
        prompt = tuple(range(1000, 1013))

        def cached(tenant: str, salt: str | None = None, tag: str = "") -> int:
            req = GenerationRequest(f"{tenant}-{salt}-{tag}", prompt, greedy(2), tenant=tenant, cache_salt=salt)
            return finish(engine.submit(req)).cached

        assert cached("acme") == 0
        assert cached("globex") == 0  # the same prompt, another tenant: computed again
        assert cached("acme", tag="again") == 12
        assert cached("acme", "s1") == 0  # a salt narrows the namespace
        assert cached("acme", "s2") == 0
        assert cached("acme", "s1", "again") == 12
        assert cached("globex", tag="again") == 12
        stats = engine.stats()
        assert stats.prefix.tokens == {"acme": (13 * 3 + 1 * 2, 12 * 2), "globex": (13 + 1, 12)}
        text = generate_latest(ServerMetrics(engine.stats).registry).decode()
        assert 'switchboard_prompt_tokens_cached_total{tenant="acme"} 24.0' in text
        assert 'switchboard_prompt_tokens_computed_total{tenant="globex"} 14.0' in text
        assert f"switchboard_prefix_cache_blocks {float(stats.prefix.cached_blocks)}" in text
        assert stats.prefix.cached_blocks >= 4 * 3  # each chain's 3 prompt blocks (and the answers' ones)
        with pytest.raises(ValueError, match="cache_salt"):
            engine.submit(GenerationRequest("bad-salt", prompt, greedy(), cache_salt=""))
    finally:
        engine.shutdown()


def test_an_operator_may_share_the_base_models_blocks_across_tenants(tiny_llama_dir: Path) -> None:
    assert configs(parse_args(["--prefix-cache-share-base"]))[1].prefix_cache_share_base is True
    engine = make_engine(tiny_llama_dir, prefix_cache_share_base=True)
    try:
        engine.pool.register("lora", peft_adapter(tiny_llama_dir, seed=33))
        prompt = tuple(range(3000, 3013))

        def cached(tenant: str, adapter: str | None = None, salt: str | None = None) -> int:
            req = GenerationRequest(f"{tenant}-{adapter}-{salt}", prompt, greedy(2), adapter=adapter, tenant=tenant,
                                    cache_salt=salt)
            return finish(engine.submit(req)).cached

        assert [cached("acme"), cached("globex")] == [0, 12]  # the base model's blocks are shared
        assert [cached("acme", "lora"), cached("globex", "lora")] == [0, 0]  # an adapter's are not
        assert [cached("acme", salt="s"), cached("globex", salt="s")] == [0, 12]  # a salt still narrows them
    finally:
        engine.shutdown()


def test_no_prefix_cache_computes_every_prompt(tiny_llama_dir: Path) -> None:
    assert configs(parse_args(["--no-prefix-cache"]))[1].prefix_cache is False
    assert configs(parse_args([]))[1].prefix_cache is True
    engine = make_engine(tiny_llama_dir, prefix_cache=False)
    try:
        prompt = tuple(range(500, 520))
        runs = [finish(engine.submit(GenerationRequest(f"off-{i}", prompt, greedy(3)))) for i in range(2)]
        assert [d.cached for d in runs] == [0, 0]
        assert runs[0].tokens == runs[1].tokens
        stats = engine.stats()
        assert stats.prefix.cached_blocks == 0 and stats.prefix.tokens == {"local": (40, 0)}
    finally:
        engine.shutdown()
