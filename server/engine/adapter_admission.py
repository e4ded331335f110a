"""A sequence's adapters at the engine's two moments: at submit, what the request names (one adapter or a
composition) is checked against the pool and turns into the context the adapter adds (prefix K/V entries, virtual
tokens) and the prefix cache's identity; at admission (the scheduler, after KV allocation), every adapter is pinned
in its device slot and the K/V entries it supplies are written; when the sequence leaves the batch, unpinned.
Names no adapter kind: the pool and the kinds' layouts say everything.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.adapters.pool import AdapterPool, UnknownAdapter
from server.config import EngineConfig
from server.engine.composition import check_parts, composition_identity, pin_parts
from server.engine.kv_cache import KVCache
from server.engine.prefix_cache import BASE_IDENTITY
from server.engine.request import GenerationRequest, InvalidRequest, UnknownAdapterRequest
from server.engine.scheduler import Admission
from server.engine.sequence import Sequence


@dataclass(frozen=True, slots=True)
class AdapterContext:
    """What a request's adapters add before its prompt, and how the prefix cache keys its blocks."""

    n_prefix: int = 0  # context entries whose K/V the adapter supplies
    n_virtual: int = 0  # context entries computed from adapter embeddings
    identity: str = BASE_IDENTITY  # the prefix cache's adapter identity (kind + content digest, or a composition)
    shared: bool = False  # the owner shared the adapter with other tenants


class AdapterAdmission:
    def __init__(self, pool: AdapterPool, kv: KVCache, cfg: EngineConfig) -> None:
        self.pool, self.kv, self.cfg = pool, kv, cfg

    def context(self, req: GenerationRequest) -> AdapterContext:
        """At submit (caller's thread): InvalidRequest / UnknownAdapterRequest for adapters the engine cannot
        serve; else the context they add."""
        if req.parts:
            if req.adapter is not None:
                raise InvalidRequest("name one adapter or a composition of adapters, not both")
            try:
                check_parts(req.parts, self.cfg.max_adapters_per_request, self.pool.cfg.device_slots,
                            self.pool.composable)
                return AdapterContext(identity=composition_identity(
                    req.parts, lambda key: self.pool.cache_identity(key)[0]))
            except UnknownAdapter as exc:
                raise UnknownAdapterRequest(f"unknown adapter {exc.args[0]!r}") from None
        if req.adapter is None:
            return AdapterContext()
        try:
            layout = self.pool.meta(req.adapter).layout
            identity, shared = self.pool.cache_identity(req.adapter)
        except UnknownAdapter:
            raise UnknownAdapterRequest(f"unknown adapter {req.adapter!r}") from None
        return AdapterContext(layout.n_prefix, layout.n_virtual, identity, shared)

    def pin(self, seq: Sequence) -> tuple[Admission, str | None]:
        """The scheduler's admission check (KV blocks already allocated): pin the sequence's adapter in its slot
        and write the context entries the adapter supplies (prefix K/V) past what the prefix cache served."""
        if seq.request.parts:
            return pin_parts(self.pool, seq)
        key = seq.request.adapter
        if key is None:
            return Admission.ADMITTED, None
        try:
            lease = self.pool.acquire(key)
        except Exception as exc:  # unregistered or unreadable since submit()
            return Admission.FAILED, f"adapter {key!r} unavailable: {exc}"
        if lease is None:
            return Admission.NOT_NOW, None
        seq.lease, seq.adapter_version = lease, lease.version
        prefix = lease.weights.spec.cached_prefix(lease.weights.payload)
        if prefix is not None and seq.num_computed < seq.n_prefix:  # entries below num_computed came from the cache
            start = seq.num_computed
            keys, values = prefix
            self.kv.write_prefix(seq.blocks, keys[:, start:], values[:, start:], start)
            seq.num_computed = seq.n_prefix
        return Admission.ADMITTED, None

    def unpin(self, seq: Sequence) -> None:
        if seq.lease is not None:
            self.pool.release(seq.lease.key)
        seq.lease = None
        for lease, _ in seq.part_leases:
            self.pool.release(lease.key)
        seq.part_leases = []
