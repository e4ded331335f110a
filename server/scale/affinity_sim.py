"""A simulation of adapter loads under Ray Serve's multiplexed routing versus routing that ignores adapters.

Model: `replicas` replicas, each with an LRU of `slots` adapters (what `@serve.multiplexed` keeps); requests
draw adapters from a zipf(s) popularity over `adapters`; a request whose adapter is not in its replica's
LRU costs one load (and evicts that replica's least recently used adapter). Routing:
- "random": the replica is drawn uniformly (Ray's default power-of-two choices with equal queues);
- "multiplexed": Ray's rule for a request with a multiplexed model id: a replica already holding it (the
  less busy of two drawn among them, here: uniformly among them), else one among those holding the fewest
  adapters (uniformly), so adapters spread over empty slots first.
Queue lengths are not modelled (every replica is equally busy): what changes is where adapters live.
Pure Python, no Ray: the bench (bench/scale_out.py) and tests (tests/test_scale_sim.py) use it.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass

POLICIES = ("random", "multiplexed")


@dataclass(frozen=True, slots=True)
class SimResult:
    policy: str
    adapters: int
    replicas: int
    slots: int
    requests: int
    loads: int
    hits: int

    @property
    def loads_per_100(self) -> float:
        return 100.0 * self.loads / self.requests

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests


def zipf_weights(n: int, s: float) -> list[float]:
    w = [1.0 / (i + 1) ** s for i in range(n)]
    total = sum(w)
    return [x / total for x in w]


def simulate(policy: str, adapters: int, replicas: int, slots: int, requests: int, s: float = 1.1,
             seed: int = 0, warmup: int | None = None) -> SimResult:
    """Loads and hits over `requests` requests, after `warmup` (default: as many) not counted."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    rng = random.Random(seed)
    warmup = requests if warmup is None else warmup
    stream = rng.choices(range(adapters), weights=zipf_weights(adapters, s), k=warmup + requests)
    lrus: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(replicas)]
    holders: dict[int, set[int]] = {}
    loads = hits = 0
    for n, a in enumerate(stream):
        r = _route(policy, a, lrus, holders, rng)
        lru = lrus[r]
        counted = n >= warmup
        if a in lru:
            lru.move_to_end(a)
            hits += counted
            continue
        loads += counted
        if len(lru) >= slots:
            old, _ = lru.popitem(last=False)
            holders[old].discard(r)
        lru[a] = None
        holders.setdefault(a, set()).add(r)
    return SimResult(policy, adapters, replicas, slots, requests, loads, hits)


def _route(policy: str, adapter: int, lrus: list[OrderedDict], holders: dict[int, set[int]],
           rng: random.Random) -> int:
    if policy == "random":
        return rng.randrange(len(lrus))
    have = holders.get(adapter)
    if have:
        return rng.choice(sorted(have))
    fewest = min(len(lru) for lru in lrus)
    return rng.choice([r for r, lru in enumerate(lrus) if len(lru) == fewest])
