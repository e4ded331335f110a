"""The affinity-routing simulation (server.scale.affinity_sim) against closed forms and a brute-force LRU."""

from __future__ import annotations

import random

import pytest

from server.scale.affinity_sim import simulate, zipf_weights


def test_one_replica_policies_agree_and_match_an_independent_lru():
    seed = random.randrange(2**31)
    a = simulate("random", adapters=50, replicas=1, slots=8, requests=3000, seed=seed)
    b = simulate("multiplexed", adapters=50, replicas=1, slots=8, requests=3000, seed=seed)
    assert a.loads == b.loads, f"seed={seed}"
    # brute force: one LRU as a list, the same request stream
    rng = random.Random(seed)
    stream = rng.choices(range(50), weights=zipf_weights(50, 1.1), k=6000)
    lru: list[int] = []
    loads = 0
    for n, x in enumerate(stream):
        if x in lru:
            lru.remove(x)
        else:
            loads += n >= 3000
            if len(lru) == 8:
                lru.pop(0)
        lru.append(x)
    assert a.loads == loads, f"seed={seed}"


def test_everything_fits_then_affinity_loads_nothing_after_warmup():
    r = simulate("multiplexed", adapters=16, replicas=4, slots=8, requests=2000, seed=1)
    assert r.loads == 0 and r.hit_rate == 1.0  # 16 adapters spread over 32 slots, each held once
    rnd = simulate("random", adapters=16, replicas=4, slots=8, requests=2000, seed=1)
    assert rnd.loads > 0  # every replica must hold all 16 to never miss: it has 8


@pytest.mark.parametrize("adapters", [100, 1000])
def test_affinity_loads_fewer_at_scale(adapters):
    seed = random.randrange(2**31)
    rnd = simulate("random", adapters, replicas=8, slots=8, requests=5000, seed=seed)
    aff = simulate("multiplexed", adapters, replicas=8, slots=8, requests=5000, seed=seed)
    assert aff.loads < rnd.loads, f"seed={seed}: {aff} vs {rnd}"


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="policy must be one of"):
        simulate("round-robin", 10, 2, 2, 10)
