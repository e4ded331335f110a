"""Prefix-aware routing's pure parts (no Ray): routing keys, a replica's summary of what it cached, the ranking.

Routing key of block j of a request (blake2b, 8 bytes, chained like the engine's prefix-cache keys):

    root  = H("switchboard-route-v1", namespace(tenant, cache_salt), adapter pool key or "")
    key_j = H(key_{j-1} or root, token ids of entries j*bs .. (j+1)*bs-1)

The adapter *pool key* (`tenant/name@version`) names one stored version, so a hot swap changes every key, as
the engine's content digest does; the namespace is the tenant (narrowed by the salt), so one tenant's keys
never equal another's: routing a request depends only on its own tenant's history (and on load), and a
summary reveals nothing a tenant could time. A key only *steers* a request: the engine's own keys decide
what is reused, so a stale or colliding summary costs speed, never correctness.

A replica keeps the keys of the first `max_blocks` full blocks of each finished request's context (prompt and
completion: the next chat turn extends both) in an LRU bounded by its KV blocks (`PrefixSummary`) and exports
them (`export`, 8 bytes a key) in its routing stats; the router's view of a replica (`ReplicaView`) is that
export plus what the router sent it since (optimistic, for `fresh_s`). `rank` prefers, among the replicas
that hold the request's adapter, the one whose view holds the longest run of its keys, unless that replica's
queue is `max_queue_gap` longer than the shortest; else the caller's adapter-affinity rule decides.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from server.engine.prefix_cache import namespace

KEY_BYTES = 8
_VERSION = b"switchboard-route-v1"


def routing_keys(tenant: str, cache_salt: str | None, adapter: str | None, token_ids: Sequence[int],
                 block_size: int, max_blocks: int) -> list[bytes]:
    """The keys of the first min(max_blocks, len(token_ids) // block_size) full blocks of `token_ids`."""
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for part in (_VERSION, namespace(tenant, cache_salt).encode(), (adapter or "").encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    prev = h.digest()
    keys: list[bytes] = []
    for j in range(min(max_blocks, len(token_ids) // block_size)):
        h = hashlib.blake2b(prev, digest_size=KEY_BYTES)
        h.update(b"".join(int(t).to_bytes(8, "little", signed=True)
                          for t in token_ids[j * block_size:(j + 1) * block_size]))
        prev = h.digest()
        keys.append(prev)
    return keys


def matched(keys: Sequence[bytes], held: set[bytes] | dict) -> int:
    """How many of `keys`, from the first, `held` contains (a chain: a miss ends the run)."""
    n = 0
    for k in keys:
        if k not in held:
            break
        n += 1
    return n


class PrefixSummary:
    """A replica's recently cached block keys, least recently used first, at most `capacity` of them."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a prefix summary needs a capacity of at least one key")
        self.capacity = capacity
        self._keys: OrderedDict[bytes, None] = OrderedDict()

    def add(self, keys: Iterable[bytes]) -> None:
        for k in keys:
            self._keys[k] = None
            self._keys.move_to_end(k)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: bytes) -> bool:
        return key in self._keys

    def export(self) -> bytes:
        return b"".join(self._keys)


def parse_export(data: bytes) -> set[bytes]:
    """The keys of an `export` (a malformed tail is ignored: routing stats are advisory)."""
    return {data[i:i + KEY_BYTES] for i in range(0, len(data) - len(data) % KEY_BYTES, KEY_BYTES)}


@dataclass(slots=True)
class ReplicaView:
    """The router's idea of one replica's cache: its last export plus the keys routed to it since."""

    fresh_s: float = 30.0  # how long a routed request's keys count without a replica's export confirming them
    exported: set[bytes] = field(default_factory=set)
    export_seq: int = -1
    routed: OrderedDict[bytes, float] = field(default_factory=OrderedDict)  # key -> when routed

    def refresh(self, stats: dict | None) -> None:
        """Take the replica's routing stats ({"prefix_keys": bytes, "seq": int}) when they are new."""
        if not stats or stats.get("seq", -1) == self.export_seq:
            return
        self.export_seq = stats.get("seq", -1)
        self.exported = parse_export(stats.get("prefix_keys", b""))

    def routed_to(self, keys: Iterable[bytes], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for k in keys:
            self.routed[k] = now
            self.routed.move_to_end(k)
        self._expire(now)

    def match(self, keys: Sequence[bytes], now: float | None = None) -> int:
        self._expire(time.monotonic() if now is None else now)
        n = 0
        for k in keys:
            if k not in self.exported and k not in self.routed:
                break
            n += 1
        return n

    def _expire(self, now: float) -> None:
        while self.routed:
            k, at = next(iter(self.routed.items()))
            if now - at <= self.fresh_s:
                return
            del self.routed[k]


@dataclass(frozen=True, slots=True)
class Candidate:
    id: object  # hashable: a replica id
    holds_adapter: bool  # True for every replica when the request has no adapter
    matched_blocks: int
    queue_len: int | None  # None: unknown


def rank(candidates: Sequence[Candidate], min_blocks: int = 1, max_queue_gap: int = 8) -> list[object]:
    """The replicas to try first (best match, ties together), or [] for "let adapter affinity decide"."""
    known = [c.queue_len for c in candidates if c.queue_len is not None]
    shortest = min(known) if known else 0
    usable = [c for c in candidates if c.holds_adapter and c.matched_blocks >= min_blocks
              and (c.queue_len is None or c.queue_len - shortest <= max_queue_gap)]
    if not usable:
        return []
    best = max(c.matched_blocks for c in usable)
    return [c.id for c in usable if c.matched_blocks == best]
