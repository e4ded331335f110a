"""The engine deployment: each replica owns one Engine on the same base model; adapters are multiplexed ids.

A request arrives with its resolved pool key (`tenant/name@version`, the request's `adapter`). With affinity
the ingress also sends it as the multiplexed model id, so Ray routes it to a replica that already holds it
(else to one holding the fewest). Either way the replica asks its `@serve.multiplexed` loader for the key:
a hit costs nothing; a miss reads the committed version from the shared store into the replica's pool
(host copy; the engine's step loop copies it into a device slot) and Ray's LRU evicts the least recently
used key beyond `adapters_per_replica`. An evicted key still used by a running request stays registered
until that request ends.

`engine_deployment(settings)` builds the class: the LRU size is fixed when `@serve.multiplexed` decorates it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
from pathlib import Path

import torch
from ray import serve

from server.adapters.errors import AdapterNotFound
from server.adapters.pool import AdapterMeta
from server.adapters.store import StoredVersion, StoreError, sha256_file
from server.engine.request import GenerationRequest, TokenEvent, merge_events
from server.scale.prefix_summary import PrefixSummary, routing_keys
from server.scale.replica_keys import ReplicaKeys
from server.scale.settings import ScaleSettings
from server.scale.shared_store import SharedDirectory, parse_key

log = logging.getLogger(__name__)
POLL_S = 1.0  # how often a waiting stream re-checks that the step loop is alive


class LoadedAdapter:
    """What the multiplexed LRU holds for one load of a key; Ray calls __del__ when it evicts it (idempotent)."""

    def __init__(self, key: str, generation: int, replica) -> None:
        self.key, self.generation, self._replica, self._gone = key, generation, replica, False

    def __del__(self) -> None:
        if not self._gone:
            self._gone = True
            self._replica.evicted(self.key, self.generation)


def engine_deployment(settings: ScaleSettings):
    """The Serve deployment class (its options from `settings`)."""
    router = settings.request_router_config()

    @serve.deployment(
        name="EngineReplica", num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.num_cpus_per_replica},
        max_ongoing_requests=settings.max_running + settings.max_waiting,
        health_check_period_s=2.0, health_check_timeout_s=30.0,
        **({"request_router_config": router} if router is not None else {}),
    )
    class EngineReplica:
        def __init__(self, settings: ScaleSettings) -> None:
            torch.set_num_threads(settings.torch_threads)
            from server.engine.engine import Engine

            self.engine = Engine.create(settings.model_config(), settings.engine_config(), settings.pool_config())
            self.engine.start()
            self.source = SharedDirectory(Path(settings.data_dir) / "adapters")
            self.loop = asyncio.get_running_loop() if _has_loop() else None
            self.keys = ReplicaKeys()  # which keys stay registered in the engine's pool
            self.requests = self.hits = 0
            self.metrics = ReplicaMetrics()
            # what the prefix-aware router reads (server.scale.prefix_router): keys of recently cached contexts
            self.summary = PrefixSummary(settings.kv_blocks)
            self.summary_seq = 0
            self.route_params = (settings.engine_config().kv_block_size, settings.route_max_blocks)

        # ---- the multiplexed loader --------------------------------------------------------------
        @serve.multiplexed(max_num_models_per_replica=settings.adapters_per_replica)
        async def adapter(self, key: str) -> LoadedAdapter:
            self.loop = self.loop or asyncio.get_running_loop()
            generation = self.keys.load_started(key)
            ok = False
            try:
                stored = self.source.fetch(*parse_key(key))  # AdapterNotFound: deleted or never stored
                await asyncio.to_thread(self._load, key, stored)
                ok = True
            finally:
                self._unregister_if(self.keys.load_ended(key, ok), key)
            self.metrics.loads.inc()
            return LoadedAdapter(key, generation, self)

        def _load(self, key: str, stored: StoredVersion) -> None:
            pool = self.engine.pool
            if not pool.revive(key):  # a key unregistered while in use is registered again as it is
                pool.register(key, lambda: self._read(stored), stored.version, meta=AdapterMeta.stored(stored.meta),
                              digest=stored.content_digest, shared=stored.shared)  # the prefix cache's identity
            pool.host_weights(key)  # read, verified and validated now, off the step loop

        def _read(self, stored: StoredVersion):
            for fname, rec in stored.files.items():
                if sha256_file(stored.path / fname) != rec["sha256"]:
                    raise StoreError(f"{stored.tenant}/{stored.name}@{stored.version}: {fname} fails its sha256")
            return self.engine.pool.reader(stored.path)

        def evicted(self, key: str, generation: int) -> None:
            """Ray's LRU let a load of `key` go (any thread): unregister it once nothing holds it."""
            if self.loop is not None:
                self.loop.call_soon_threadsafe(lambda: self._unregister_if(self.keys.evicted(key, generation), key))

        def _unregister_if(self, unused: bool, key: str) -> None:
            if unused:
                self.engine.pool.unregister(key)

        # ---- requests ----------------------------------------------------------------------------
        async def generate(self, request: GenerationRequest):
            """The request's TokenEvents (merged when the caller lags); engine errors raise to the caller."""
            self.requests += 1
            self.metrics.requests.inc()
            acquired: list[str] = []  # the adapter, or every part of a composition (server/engine/composition.py)
            try:
                for key in request.adapter_keys:
                    try:
                        self.source.check(*parse_key(key))  # deleted through any ingress: refused here too
                    except AdapterNotFound:
                        self._unregister_if(self.keys.forget(key), key)
                        raise
                    if key in self.keys.resident:
                        self.hits += 1
                        self.metrics.hits.inc()
                    await self.adapter(key)
                    self.keys.acquire(key)  # no await since the load: no eviction can come between
                    acquired.append(key)
                handle = self.engine.submit(request)  # InvalidRequest / QueueFull / ...: to the caller
                wake = asyncio.Event()
                loop = asyncio.get_running_loop()
                handle.set_listener(lambda: loop.call_soon_threadsafe(wake.set))
                finished, context = False, list(request.prompt_token_ids)
                try:
                    while not finished:
                        wake.clear()
                        events = _drain(handle)
                        if not events:
                            try:
                                await asyncio.wait_for(wake.wait(), POLL_S)
                            except TimeoutError:
                                if not self.engine.alive:
                                    raise RuntimeError("the replica's engine is not running") from None
                            continue
                        event = merge_events(events)
                        finished = event.finished
                        context += event.token_ids
                        if finished and event.error is None:
                            self._cached(request, context)
                        self.metrics.tokens.inc(len(event.token_ids))
                        yield event
                finally:
                    if not finished:  # the caller went away (cancelled) or the stream failed
                        self.engine.abort(request.request_id)
            finally:
                for key in acquired:
                    self._unregister_if(self.keys.release(key), key)

        def _cached(self, request: GenerationRequest, context: list[int]) -> None:
            """A finished request's context (prompt and completion) now sits in the prefix cache: summarize it."""
            self.summary.add(routing_keys(request.tenant, request.cache_salt, request.adapter, context,
                                          *self.route_params))
            self.summary_seq += 1

        def record_routing_stats(self) -> dict:
            """Ray polls it every routing_stats_period_s for the routers (server.scale.prefix_router)."""
            return {"prefix_keys": self.summary.export(), "seq": self.summary_seq}

        def stats(self) -> dict:
            """This replica's counters (tests and the bench read them through each replica)."""
            ctx = serve.get_replica_context()
            return {"replica": ctx.replica_id.unique_id, "pid": os.getpid(), "requests": self.requests,
                    "hits": self.hits, "loads": dict(self.keys.loads), "resident": sorted(self.keys.resident),
                    "engine_alive": self.engine.alive}

        def check_health(self) -> None:
            """Ray restarts a replica whose step loop died."""
            if not self.engine.alive:
                raise RuntimeError("the engine's step loop is not running")

        def __del__(self) -> None:
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.shutdown(drain_timeout_s=0.0)

    return EngineReplica


class ReplicaMetrics:
    """Per-replica counters through Ray's metrics export (each node's Prometheus endpoint; Ray adds the
    replica, deployment and node labels, so the operator's scraper sums or splits them)."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.requests = metrics.Counter("switchboard_replica_requests", "requests this replica served")
        self.hits = metrics.Counter("switchboard_replica_adapter_hits", "requests whose adapter was resident")
        self.loads = metrics.Counter("switchboard_replica_adapter_loads", "multiplexed adapter loads")
        self.tokens = metrics.Counter("switchboard_replica_generated_tokens", "tokens this replica generated")


def _drain(handle) -> list[TokenEvent]:
    events = []
    while True:
        try:
            events.append(handle.get(timeout=0))
        except queue.Empty:
            return events
        if events[-1].finished:
            return events


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False
