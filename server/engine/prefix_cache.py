"""The adapter-aware prefix cache: full KV blocks addressed by their content, reused across requests and turns.

Key of full block j of a sequence's context (blake2b, 32 bytes, over a fixed little-endian encoding):

    root  = H("switchboard-prefix-v1", namespace, adapter identity)
    key_j = H(key_{j-1} or root, root, token ids of context entries j*bs .. (j+1)*bs-1)

namespace = the tenant ("*" for the base model, or an adapter its owner shared, when the operator shares
those blocks across tenants: EngineConfig.prefix_cache_share_base / _share_adapters), narrowed by the
request's `cache_salt`; adapter identity = "base", or the served version's kind and the sha256 of its files
(server.adapters.pool.AdapterPool.cache_identity). Any adapter changes the K/V of every layer after the first,
so the identity is in every key: a hot swap gets new keys, another tenant never finds (or times) this tenant's
blocks. Context entries the adapter supplies
(prefix-tuning K/V, prompt-tuning / P-tuning virtual tokens) enter the chain as token id -1: the identity
fixes their content, so they are cached and shared like any other entry.

Admission (`match` / `admit`) takes the longest run of cached blocks of the sequence's context, at most up to
its last entry minus one (the last entry is always computed: its logits are sampled), and computes the rest.
After every step `commit` keys the blocks the step filled, prompt and generated tokens alike (the next turn
of a chat finds the answer cached too); a key already held by another block leaves this copy unkeyed. The
partially filled tail block is never keyed, so never shared. Preemption and finish release blocks to the
allocator, which keeps keyed ones cached (server.engine.block_allocator).
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections import deque
from dataclasses import dataclass, field

from server.engine.kv_cache import KVCache
from server.engine.request import InvalidRequest
from server.engine.sequence import Sequence

BASE_IDENTITY = "base"
SHARED_NAMESPACE = "*"  # not a tenant name: the namespace of blocks an operator shares across tenants
_VERSION = b"switchboard-prefix-v1"
_SUPPLIED = -1  # token id of a context entry the adapter supplies (prefix K/V, virtual token)


def _field(h: hashlib.blake2b, data: bytes) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def namespace(tenant: str, cache_salt: str | None = None) -> str:
    """The cache namespace of a request: its tenant, narrowed by its salt."""
    return tenant if cache_salt is None else f"{tenant}\x00salt\x00{cache_salt}"


def chain_root(space: str, identity: str) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    for part in (_VERSION, space.encode(), identity.encode()):
        _field(h, part)
    return h.digest()


def block_key(parent: bytes | None, root: bytes, tokens: list[int]) -> bytes:
    """The content key of one full block whose predecessor's key is `parent` (None for the first block)."""
    ids = array("q", tokens)
    if sys.byteorder != "little":
        ids.byteswap()
    h = hashlib.blake2b(digest_size=32)
    _field(h, parent or root)
    _field(h, root)
    _field(h, ids.tobytes())
    return h.digest()


@dataclass(frozen=True, slots=True)
class PrefixCacheStats:
    enabled: bool = False
    cached_blocks: int = 0  # blocks holding a key (referenced or not)
    evictions: int = 0  # cached blocks taken for other content
    # tenant -> (tokens computed, tokens served from the cache) at admissions: each prompt at its first; the
    # prompt and generated tokens again at a re-admission after preemption (recomputed but for cached blocks)
    tokens: dict[str, tuple[int, int]] = field(default_factory=dict)


class PrefixCache:
    """The engine thread's view of the cache; `prepare` runs on the submitting thread, before the sequence is queued."""

    def __init__(self, kv: KVCache, enabled: bool = True, share_base: bool = False, share_adapters: bool = False
                 ) -> None:
        self.kv = kv
        self.enabled = enabled
        self.share_base = share_base  # the operator shares the base model's blocks across tenants
        self.share_adapters = share_adapters  # ... and those of adapters their owners shared with other tenants
        self._tokens: dict[str, list[int]] = {}  # tenant -> [computed, cached] prompt tokens
        self.dropped: deque[str] = deque()  # identities of deleted adapter versions (appended from any thread)

    # ---- submit side ---------------------------------------------------------------------------
    def prepare(self, seq: Sequence, identity: str, shared_adapter: bool = False) -> None:
        """Give `seq` its chain root and its prompt's block keys (hashing off the step loop). `shared_adapter`:
        its adapter is visible to other tenants."""
        req = seq.request
        if req.cache_salt is not None and not (isinstance(req.cache_salt, str) and 0 < len(req.cache_salt) <= 256):
            raise InvalidRequest("cache_salt must be a non-empty string of at most 256 characters")
        if not self.enabled:
            return
        base = identity == BASE_IDENTITY
        shared = (self.share_base and base) or (self.share_adapters and shared_adapter and not base)
        tenant = SHARED_NAMESPACE if shared else req.tenant
        seq.cache_root = chain_root(namespace(tenant, req.cache_salt), identity)
        seq.cache_tag = identity
        self._keys(seq, seq.context_len // self.kv.block_size)

    # ---- step loop -----------------------------------------------------------------------------
    def match(self, seq: Sequence) -> list[int]:
        """The cached blocks of `seq`'s longest cached prefix, leaving its last context entry to compute."""
        if seq.cache_root is None:
            return []
        return self.kv.blocks.lookup(self._keys(seq, (seq.context_len - 1) // self.kv.block_size))

    def cost(self, seq: Sequence, hits: list[int]) -> int:
        """Available blocks admitting `seq` with `hits` consumes: new blocks plus hits that nobody holds now."""
        fresh = self.kv.blocks_needed(len(hits), seq.context_len + 1)
        return fresh + sum(self.kv.blocks.refs(b) == 0 for b in hits)

    def admit(self, seq: Sequence, hits: list[int]) -> int:
        """Take `hits` and allocate the rest of `seq`'s blocks (check `cost` first); returns the cached entries."""
        fresh = self.kv.blocks_needed(len(hits), seq.context_len + 1)
        seq.blocks = self.kv.share(hits)
        seq.blocks += self.kv.allocate(fresh)
        seq.n_committed = len(hits)
        seq.num_computed = len(hits) * self.kv.block_size
        return seq.num_computed

    def account(self, seq: Sequence, cached_entries: int) -> int:
        """An admission, in its tenant's counters: the tokens of the context it computes and those the cache
        served (computed + cached = the tokens admission saw). The first admission sees the prompt and sets the
        sequence's cached prompt tokens (its bill); a re-admission after preemption sees the prompt and the
        tokens generated so far, and recomputes all but its cached blocks. Returns the prompt tokens a first
        admission computes (what the fair scheduler charges), 0 for a re-admission (the engine preempted it)."""
        supplied = seq.n_prefix + seq.n_virtual
        first = seq.first_scheduled is None
        seen = len(seq.prompt_ids) if first else seq.context_len - supplied
        cached = min(seen, max(0, cached_entries - supplied))
        row = self._tokens.setdefault(seq.request.tenant, [0, 0])
        row[0] += seen - cached
        row[1] += cached
        if not first:
            return 0
        seq.cached_prompt_tokens = cached
        return seen - cached

    def commit(self, seq: Sequence) -> None:
        """Key the blocks of `seq` that are now full and computed (after a step)."""
        if seq.cache_root is None:
            return
        full = seq.num_computed // self.kv.block_size
        if seq.n_committed >= full:
            return
        keys = self._keys(seq, full)
        for j in range(seq.n_committed, full):
            self.kv.blocks.register(seq.blocks[j], keys[j], seq.cache_tag)
        seq.n_committed = full

    @staticmethod
    def fork(parent: Sequence, sibling: Sequence, shared: int) -> None:
        """`sibling` shares `parent`'s first `shared` blocks (same prompt, adapter and namespace)."""
        sibling.block_keys = parent.block_keys[:shared]
        sibling.n_committed = min(shared, parent.n_committed)
        sibling.cached_prompt_tokens = parent.cached_prompt_tokens

    @staticmethod
    def release(seq: Sequence) -> None:
        """`seq` let go of its blocks (preempted, failed admission or finished)."""
        seq.n_committed = 0

    def drop_dropped(self) -> int:
        """Free the cached blocks of the deleted adapter versions queued in `dropped`; returns how many."""
        n = 0
        while self.dropped:
            n += self.kv.blocks.drop_tag(self.dropped.popleft())
        return n

    def stats(self) -> PrefixCacheStats:
        tokens = {t: (v[0], v[1]) for t, v in list(self._tokens.items())}
        return PrefixCacheStats(self.enabled, self.kv.blocks.cached, self.kv.blocks.evictions, tokens)

    # ---- internals -----------------------------------------------------------------------------
    def _keys(self, seq: Sequence, n: int) -> list[bytes]:
        """The keys of `seq`'s first `n` full blocks (computed on first use and kept)."""
        keys, bs, supplied = seq.block_keys, self.kv.block_size, seq.n_prefix + seq.n_virtual
        while len(keys) < n:
            start = len(keys) * bs
            tokens = [_SUPPLIED if i < supplied else seq.token_at(i) for i in range(start, start + bs)]
            keys.append(block_key(keys[-1] if keys else None, seq.cache_root, tokens))
        return keys[:n]
