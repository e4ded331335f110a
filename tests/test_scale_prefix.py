"""Prefix-aware routing on Ray Serve, without Ray: routing keys (server.scale.prefix_summary), the ranking rule
and the chat simulation (server.scale.prefix_sim) against adapter affinity alone. The Ray case is in
tests/test_scale_ray.py."""

from __future__ import annotations

import random

import pytest

from server.scale.prefix_sim import ChatLoad, simulate_chats
from server.scale.prefix_summary import (
    KEY_BYTES,
    Candidate,
    PrefixSummary,
    ReplicaView,
    matched,
    parse_export,
    rank,
    routing_keys,
)


def _keys(tokens, tenant="acme", salt=None, adapter=None, bs=4, max_blocks=64):
    return routing_keys(tenant, salt, adapter, tokens, bs, max_blocks)


def test_keys_chain_over_full_blocks_and_separate_tenants_salts_and_adapter_versions() -> None:
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    tokens = [rng.randrange(50000) for _ in range(23)]
    keys = _keys(tokens)
    assert len(keys) == 5 and all(len(k) == KEY_BYTES for k in keys), f"seed={seed}"
    assert _keys(tokens[:12]) == keys[:3]  # a prefix's keys are a prefix of the keys
    assert _keys(tokens, max_blocks=2) == keys[:2]
    changed = tokens[:5] + [tokens[5] + 1] + tokens[6:]  # block 1 differs: it and every later key change
    other = _keys(changed)
    assert other[0] == keys[0] and all(a != b for a, b in zip(other[1:], keys[1:], strict=True)), f"seed={seed}"
    variants = [_keys(tokens, tenant="beta"), _keys(tokens, salt="s"), _keys(tokens, adapter="acme/x@1"),
                _keys(tokens, adapter="acme/x@2")]  # a hot swap is a new version: new keys
    for v in variants:
        assert not set(v) & set(keys), f"seed={seed}"
    assert _keys(tokens, tenant="a", salt="b") != _keys(tokens, tenant="ab")


def test_summary_is_a_bounded_lru_and_its_export_round_trips() -> None:
    s = PrefixSummary(capacity=4)
    a, b = _keys(list(range(12))), _keys(list(range(100, 108)))
    s.add(a)
    s.add(b)  # 5 keys: the least recently added one (a[0]) goes
    assert len(s) == 4 and a[0] not in s and a[1] in s
    assert parse_export(s.export()) == {a[1], a[2], *b}
    assert parse_export(s.export() + b"xyz") == {a[1], a[2], *b}  # a torn tail is ignored
    assert matched(a, parse_export(s.export())) == 0  # a chain missing its first block matches nothing
    with pytest.raises(ValueError):
        PrefixSummary(0)


def test_view_is_the_export_plus_recently_routed_keys() -> None:
    keys = _keys(list(range(16)))
    v = ReplicaView(fresh_s=10)
    v.routed_to(keys[:2], now=100.0)
    assert v.match(keys, now=105.0) == 2
    assert v.match(keys, now=111.0) == 0  # unconfirmed by an export: forgotten
    v.refresh({"prefix_keys": b"".join(keys[:3]), "seq": 1})
    assert v.match(keys, now=200.0) == 3
    v.refresh({"prefix_keys": b"", "seq": 1})  # same seq: not taken again
    assert v.match(keys, now=200.0) == 3
    v.refresh({"prefix_keys": b"", "seq": 2})  # the replica evicted them
    assert v.match(keys, now=200.0) == 0


def test_rank_prefers_the_adapter_holder_with_the_longest_match_within_the_queue_gap() -> None:
    c = Candidate
    assert rank([c("r0", True, 2, 0), c("r1", True, 5, 1), c("r2", False, 9, 0)]) == ["r1"]  # r2 lacks the adapter
    assert rank([c("r0", True, 3, 0), c("r1", True, 3, None)]) == ["r0", "r1"]  # ties together (the queue decides)
    assert rank([c("r0", True, 0, 0), c("r1", True, 0, 0)]) == []  # no match: affinity decides
    assert rank([c("r0", True, 9, 20), c("r1", True, 1, 2)], max_queue_gap=8) == ["r1"]  # r0 is far busier
    assert rank([c("r0", True, 9, 20), c("r1", True, 0, 2)], max_queue_gap=8) == []
    assert rank([c("r0", True, 1, 0)], min_blocks=2) == []


def test_another_tenants_history_never_steers_a_request() -> None:
    """Replica 0 served tenant acme's prompt; beta sends the same tokens: no replica matches, affinity decides."""
    prompt = list(range(64))
    views = [ReplicaView(), ReplicaView()]
    views[0].refresh({"prefix_keys": b"".join(_keys(prompt, tenant="acme")), "seq": 1})
    beta = _keys(prompt, tenant="beta")
    assert [v.match(beta) for v in views] == [0, 0]
    assert rank([Candidate(i, True, v.match(beta), 0) for i, v in enumerate(views)]) == []
    acme = _keys(prompt, tenant="acme")
    assert rank([Candidate(i, True, v.match(acme), 0) for i, v in enumerate(views)]) == [0]


def test_simulated_chats_reuse_more_with_prefix_routing_than_with_affinity_alone() -> None:
    """Three seeds together (one seed in 300 ties: both policies may land every turn on the same replicas)."""
    seed = random.randrange(2**31)
    load = ChatLoad(conversations=24, turns=3, tenants=2, adapters=3, system_tokens=256, turn_tokens=48,
                    block_size=16, max_blocks=32)
    gain = 0
    for s in range(seed, seed + 3):
        aff = simulate_chats("affinity", load, replicas=4, slots=2, kv_blocks=256, seed=s)
        pre = simulate_chats("prefix", load, replicas=4, slots=2, kv_blocks=256, seed=s)
        assert aff.prompt_tokens == pre.prompt_tokens and aff.requests == pre.requests == 72, f"seed={s}"
        assert pre.adapter_loads <= aff.adapter_loads + 2, f"seed={s}: {pre} vs {aff}"
        assert pre.max_share < 0.75, f"seed={s}: {pre}"  # the queue gap keeps it from piling onto one replica
        gain += pre.cached_tokens - aff.cached_tokens
    assert gain > 0, f"seed={seed}"


def test_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="policy must be one of"):
        simulate_chats("random", ChatLoad(conversations=1))
