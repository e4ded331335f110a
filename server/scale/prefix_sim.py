"""A simulation of prefix-aware routing (server.scale.prefix_router's rule) against adapter affinity alone.

Model: `replicas` replicas, each with an LRU of `slots` adapters and a prefix cache of `kv_blocks` blocks (an
LRU of block keys: server.scale.prefix_summary's chained keys stand for the engine's, which chain the same way).
Workload: multi-turn chats: `conversations` conversations of `turns` turns, each of one of `tenants` tenants and
one of `adapters` adapters (0 = the base model), its first prompt a `system_tokens`-token system prompt of its
tenant plus a `turn_tokens`-token user turn, each later prompt the previous context (prompt and a
`turn_tokens`-token answer) plus a new user turn. Turns arrive interleaved (each round, every live
conversation sends its next turn, in random order). A request is "in flight" for the next `in_flight`
arrivals: that is the replicas' queue length. Routers see each replica's cache as exported every
`stats_every` requests plus what they routed since (as the Ray router does).
Policies: "affinity": Ray's multiplexed rule with power of two choices (two random replicas among those
holding the adapter, else among those holding the fewest adapters, the shorter queue wins; without an
adapter: two random replicas); "prefix": the replicas `rank` prefers, else "affinity".
Pure Python, no Ray: tests (tests/test_scale_prefix.py) and bench/scale_out.py use it.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from dataclasses import dataclass

from server.scale.prefix_summary import Candidate, PrefixSummary, ReplicaView, matched, rank, routing_keys

POLICIES = ("affinity", "prefix")


@dataclass(frozen=True, slots=True)
class PrefixSimResult:
    policy: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    adapter_loads: int
    max_share: float  # the busiest replica's share of the requests

    @property
    def cached_fraction(self) -> float:
        return self.cached_tokens / self.prompt_tokens


@dataclass(frozen=True, slots=True)
class ChatLoad:
    conversations: int = 48
    turns: int = 3
    tenants: int = 2
    adapters: int = 4  # adapter ids 1..adapters; 0 = base
    system_tokens: int = 768
    turn_tokens: int = 48
    block_size: int = 16
    max_blocks: int = 64


def simulate_chats(policy: str, load: ChatLoad, replicas: int = 4, slots: int = 2, kv_blocks: int = 512,
                   in_flight: int = 8, stats_every: int = 8, seed: int = 0) -> PrefixSimResult:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    rng = random.Random(seed)
    caches = [PrefixSummary(kv_blocks) for _ in range(replicas)]
    lrus: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(replicas)]
    views = [ReplicaView(fresh_s=float("inf")) for _ in range(replicas)]
    queue: deque[int] = deque()
    served = [0] * replicas
    systems = [[rng.randrange(1000) for _ in range(load.system_tokens)] for _ in range(load.tenants)]
    convs = [(c % load.tenants, rng.randrange(load.adapters + 1), list(systems[c % load.tenants]))
             for c in range(load.conversations)]
    prompt_total = cached_total = loads = n = 0
    for _ in range(load.turns):
        for c in rng.sample(range(len(convs)), len(convs)):
            tenant, adapter, context = convs[c]
            context += [rng.randrange(1000) for _ in range(load.turn_tokens)]  # the user's turn
            keys = routing_keys(f"t{tenant}", None, f"a{adapter}" if adapter else None, context, load.block_size,
                                load.max_blocks)
            queue_len = [queue.count(r) for r in range(replicas)]
            r = _route(policy, adapter, keys, lrus, views, queue_len, rng, n)
            queue.append(r)
            if len(queue) > in_flight:
                queue.popleft()
            views[r].routed_to(keys, now=0.0)
            served[r] += 1
            if adapter:
                if adapter in lrus[r]:
                    lrus[r].move_to_end(adapter)
                else:
                    loads += 1
                    lrus[r][adapter] = None
                    if len(lrus[r]) > slots:
                        lrus[r].popitem(last=False)
            hit = min(matched(keys, caches[r]), (len(context) - 1) // load.block_size)
            prompt_total += len(context)
            cached_total += hit * load.block_size
            context += [rng.randrange(1000) for _ in range(load.turn_tokens)]  # the answer
            caches[r].add(routing_keys(f"t{tenant}", None, f"a{adapter}" if adapter else None, context,
                                       load.block_size, load.max_blocks))
            n += 1
            if n % stats_every == 0:
                for i, view in enumerate(views):
                    view.refresh({"prefix_keys": caches[i].export(), "seq": n})
                    view.routed.clear()
    return PrefixSimResult(policy, n, prompt_total, cached_total, loads, max(served) / n)


def _route(policy: str, adapter: int, keys: list[bytes], lrus: list[OrderedDict], views: list[ReplicaView],
           queue_len: list[int], rng: random.Random, n: int) -> int:
    if policy == "prefix":
        cands = [Candidate(r, not adapter or adapter in lrus[r], views[r].match(keys, now=0.0), queue_len[r])
                 for r in range(len(lrus))]
        best = rank(cands)
        if best:
            return min(best, key=lambda r: queue_len[r])
    if adapter:
        ids = [r for r, lru in enumerate(lrus) if adapter in lru]
        if not ids:
            fewest = min(len(lru) for lru in lrus)
            ids = [r for r, lru in enumerate(lrus) if len(lru) == fewest]
    else:
        ids = list(range(len(lrus)))
    two = rng.sample(ids, min(2, len(ids)))
    return min(two, key=lambda r: queue_len[r])
