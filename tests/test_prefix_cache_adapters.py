"""The prefix cache with every adapter kind: mixed batches whose sequences all start with the same system
prompt give the same greedy tokens with the cache on and off (dense, and NF4 with chunked prefill), each
adapter reusing only its own blocks (prefix-tuning K/V and virtual tokens included); a hot swap never reuses
the old version's blocks, identical bytes do share them, a deleted adapter's blocks are dropped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.adapters.registry import open_registry
from server.engine.request import GenerationRequest, SamplingParams
from tests.adapter_files import peft_adapter
from tests.oracle_parity import draw_seed
from tests.prefix_cache_utils import assert_cache_changes_nothing, cacheable, finish, greedy, make_engine
from tests.test_kinds_mixed import make_all


@pytest.fixture(scope="module")
def every_kind(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    return make_all(tiny_llama_dir, tmp_path_factory.mktemp("prefix-every-kind"))


@pytest.mark.parametrize(("quantize", "max_batch_tokens"), [(False, 2048), (True, 24)], ids=["dense", "nf4-chunked"])
def test_every_kind_in_mixed_batches_equals_the_cache_off(tiny_llama_dir: Path, every_kind: dict[str, Path],
                                                          quantize: bool, max_batch_tokens: int) -> None:
    seed = draw_seed()
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(0, 49152, (10,), generator=g).tolist()  # the same tokens under every adapter

    def suffix(n: int) -> list[int]:
        return torch.randint(0, 49152, (n,), generator=g).tolist()

    routes: list[str | None] = [None, *every_kind]
    first = [GenerationRequest(f"a-{r}", tuple(system + suffix(5)), greedy(4), adapter=r) for r in routes]
    second = [GenerationRequest(f"b-{r}", tuple(system + suffix(6)), greedy(4), adapter=r) for r in routes]
    again = [GenerationRequest(f"c-{r}", first[i].prompt_token_ids + tuple(suffix(3)), greedy(3), adapter=r)
             for i, r in enumerate(routes)]
    choices = []  # n = 2 for a prefix-tuning and a prompt-tuning adapter: one prompt, two seeds
    for r in ("prefix-b", "prompt-a"):
        ids = tuple(system + suffix(3))
        choices.append([GenerationRequest(f"n-{r}-{i}", ids, SamplingParams(
            max_new_tokens=4, temperature=0.9, seed=seed + i, ignore_eos=True), adapter=r) for i in range(2)])
    layouts = {}

    def inspect(engine, on):
        layouts.update({r: engine.pool.meta(r).layout for r in every_kind})

    waves = [[[r] for r in first], [[r] for r in second + again] + choices]
    done = assert_cache_changes_nothing(tiny_llama_dir, waves, quantize=quantize, adapters=every_kind,
                                        inspect=inspect, max_batch_tokens=max_batch_tokens, kv_blocks=1024)
    assert [d.cached for d in done[0]] == [0] * len(routes)  # one batch: nothing was computed before it
    for i, r in enumerate(routes):
        layout = layouts.get(r)
        supplied = 0 if layout is None else layout.n_prefix + layout.n_virtual
        computed = [list(first[i].prompt_token_ids) + done[0][i].tokens[:-1]]  # this adapter's own blocks only
        for d, req in ((done[1][i], second[i]), (done[1][len(routes) + i], again[i])):
            want = cacheable(list(req.prompt_token_ids), computed, supplied)
            assert d.cached == want, (r, req.request_id, d.cached, want, seed)
        if supplied == 0:
            assert done[1][i].cached == 8, (r, seed)  # two of the shared system prompt's blocks
    assert any(d.cached for d in done[1][-4:])  # the n choices of prefix / prompt adapters found their blocks


def run_alone(model_dir: Path, path: Path, prompt: tuple[int, ...]) -> list[int]:
    """The oracle: a cold engine with the cache off serving the adapter at `path`."""
    engine = make_engine(model_dir, prefix_cache=False)
    try:
        engine.pool.register("cold", path)
        return finish(engine.submit(GenerationRequest("cold", prompt, greedy(6), adapter="cold"))).tokens
    finally:
        engine.shutdown()


def test_hot_swap_delete_and_identical_bytes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    v1, v2 = peft_adapter(tiny_llama_dir, seed=71), peft_adapter(tiny_llama_dir, seed=72)
    prompt = tuple(range(2000, 2013))
    engine = make_engine(tiny_llama_dir)
    registry = open_registry(tmp_path / "data", engine.pool)
    try:
        def serve(tag: str) -> tuple[list[int], int]:
            key = registry.resolve("acme", "swap").pool_key
            d = finish(engine.submit(GenerationRequest(tag, prompt, greedy(6), adapter=key, tenant="acme")))
            assert d.error is None, d.error
            return d.tokens, d.cached

        registry.create("acme", "swap", v1)
        first, cached = serve("v1-a")
        assert cached == 0 and serve("v1-b") == (first, 12)
        registry.create("acme", "swap", v2)  # version 2 under the same name: new content, new keys
        second, cached = serve("v2-a")
        assert cached == 0 and second == run_alone(tiny_llama_dir, v2, prompt) and second != first
        registry.create("acme", "swap", v1)  # version 3 has version 1's bytes: the same content address
        assert serve("v3-a") == (first, 12)
        tags = [t for t in engine.kv.blocks._tag if t is not None]
        assert len(set(tags)) == 2 and all(t.startswith("LORA:sha256:") for t in tags)
        base_before = finish(engine.submit(GenerationRequest("base-a", prompt, greedy(2), tenant="acme")))
        assert base_before.cached == 0
        registry.delete("acme", "swap")
        finish(engine.submit(GenerationRequest("base-b", prompt, greedy(2), tenant="acme")))  # a step drops them
        tags = [t for t in engine.kv.blocks._tag if t is not None]
        assert set(tags) == {"base"}, set(tags)
        assert engine.stats().prefix.cached_blocks == len(tags) and engine.kv.blocks.problems([]) == []
    finally:
        engine.shutdown()


@pytest.mark.parametrize("share", [False, True], ids=["per-tenant", "operator-shared"])
def test_an_operator_may_share_the_blocks_of_shared_adapters(tiny_llama_dir: Path, tmp_path: Path,
                                                            share: bool) -> None:
    engine = make_engine(tiny_llama_dir, prefix_cache_share_adapters=share)
    registry = open_registry(tmp_path / "data", engine.pool)
    try:
        registry.create("acme", "pub", peft_adapter(tiny_llama_dir, seed=81), shared=True)
        registry.create("acme", "priv", peft_adapter(tiny_llama_dir, seed=82))
        prompt = tuple(range(4000, 4013))

        def cached(tenant: str, name: str) -> int:
            key = registry.resolve(tenant, name).pool_key
            d = finish(engine.submit(GenerationRequest(f"{tenant}-{name}", prompt, greedy(2), adapter=key,
                                                       tenant=tenant)))
            assert d.error is None, d.error
            return d.cached

        assert [cached("acme", "pub"), cached("globex", "acme/pub")] == [0, 12 if share else 0]
        assert [cached("acme", "priv"), cached("admin", "acme/priv")] == [0, 0]  # a private adapter: never
    finally:
        engine.shutdown()
