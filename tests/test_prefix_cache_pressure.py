"""Eviction under KV pressure: 500 short requests of two tenants with random shared prefixes on a KV budget far
below what they would hold; every request completes with the tokens the cache-off engine gives, and after every
step the allocator's invariants hold (no block both free and held or cached, one block per key, refcounts equal
to the number of running sequences holding each block)."""

from __future__ import annotations

from pathlib import Path

import torch

from server.engine.engine import Engine
from server.engine.request import GenerationRequest, RequestHandle, SamplingParams
from tests.oracle_parity import draw_seed
from tests.prefix_cache_utils import finish, make_engine

N_REQUESTS = 500


def workload(seed: int) -> list[GenerationRequest]:
    """Prompts from a tree of shared pieces: one of 6 roots (5-14 tokens), often one of 3 branches under it, then
    a private tail (1-4 tokens); 1-3 new tokens each, tenants drawn at random."""
    g = torch.Generator().manual_seed(seed)

    def draw(lo: int, hi: int) -> list[int]:
        return torch.randint(0, 49152, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()

    roots = [draw(5, 14) for _ in range(6)]
    branches = [[draw(2, 6) for _ in range(3)] for _ in roots]
    reqs = []
    for i in range(N_REQUESTS):
        r = int(torch.randint(0, 6, (1,), generator=g))
        b = int(torch.randint(0, 4, (1,), generator=g))
        prompt = roots[r] + (branches[r][b] if b < 3 else []) + draw(1, 4)
        tenant = "acme" if torch.rand(1, generator=g) < 0.5 else "globex"
        params = SamplingParams(max_new_tokens=int(torch.randint(1, 4, (1,), generator=g)), ignore_eos=True)
        reqs.append(GenerationRequest(f"q{i}", tuple(prompt), params, tenant=tenant))
    return reqs


def drive(engine: Engine, reqs: list[GenerationRequest], check: bool) -> list[list[int]]:
    """Submit everything, then step the engine on this thread until all are done (checking invariants)."""
    handles: list[RequestHandle] = [engine.submit(r) for r in reqs]
    for _ in range(20_000):
        engine.take_submitted()
        if not engine.scheduler.has_work():
            break
        engine.step()
        if check:
            problems = engine.kv.blocks.problems([s.blocks for s in engine.scheduler.running])
            assert problems == [], problems
    else:
        raise AssertionError("the engine did not finish the workload")
    results = [finish(h, timeout=1) for h in handles]
    assert [r.error for r in results if r.error] == []
    assert all(r.finish_reason.value == "length" for r in results)
    return [r.tokens for r in results]


def test_500_requests_with_shared_prefixes_on_a_small_kv_budget(tiny_llama_dir: Path) -> None:
    seed = draw_seed()
    reqs = workload(seed)
    cfg = {"kv_blocks": 40, "max_running": 32, "max_waiting": N_REQUESTS, "max_batch_tokens": 128, "start": False}
    on = make_engine(tiny_llama_dir, **cfg)
    off = make_engine(tiny_llama_dir, prefix_cache=False, **cfg)
    got = drive(on, reqs, check=True)
    want = drive(off, reqs, check=False)
    assert got == want, f"seed {seed}"
    stats = on.stats()
    computed, cached = zip(*stats.prefix.tokens.values(), strict=True)
    assert sum(cached) > 0 and stats.prefix.evictions > 0, (stats, seed)  # it reused blocks and had to evict
    assert sum(computed) + sum(cached) == sum(len(r.prompt_token_ids) for r in reqs)
    assert stats.kv_blocks_used == 0 and on.kv.blocks.problems([]) == []
    assert stats.prefix.cached_blocks <= on.kv.num_blocks
