"""PrefixAwareRouter: Ray Serve's request router for the engine deployment, preferring the replica that holds
the request's adapter and the longest cached prefix of it (server.scale.prefix_summary), else Ray's own rule:
power of two choices among the replicas its multiplexed (adapter) affinity offers.

It runs inside the ingress's deployment handle. Each replica's view: its routing stats (`record_routing_stats`
of server.scale.replica: the keys of what it cached lately, every `request_routing_stats_period_s`) plus the
keys of requests this router sent it since (`on_request_routed`, so the next turn of a chat follows the first
at once). The preferred replicas come first; Ray's usual choice follows as the next rank, taken when they are
full. A routing task serves the request it was started for (not the next one in FIFO order, as Ray's
default router may): the choice depends on the request's prompt.
"""

from __future__ import annotations

import random

from ray.serve.request_router import LocalityMixin, MultiplexMixin, RequestRouter

from server.engine.request import GenerationRequest
from server.scale.prefix_summary import Candidate, ReplicaView, rank, routing_keys

_PENDING_CAP = 65536  # keys of requests being routed, kept until routed (bounded against a leak)


class PrefixAwareRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, block_size: int = 16, max_blocks: int = 64, min_blocks: int = 1,
                         max_queue_gap: int = 8, fresh_s: float = 30.0) -> None:
        self.block_size, self.max_blocks = block_size, max_blocks
        self.min_blocks, self.max_queue_gap, self.fresh_s = min_blocks, max_queue_gap, fresh_s
        self._views: dict[object, ReplicaView] = {}
        self._pending: dict[str, list[bytes]] = {}
        self.prefix_routed = 0  # requests whose first choice came from a prefix match

    def _keys(self, pending_request) -> list[bytes]:
        if pending_request is None or not pending_request.args:
            return []
        rid = pending_request.metadata.internal_request_id
        keys = self._pending.get(rid)
        if keys is None:
            req = pending_request.args[0]
            if not isinstance(req, GenerationRequest):
                return []
            keys = routing_keys(req.tenant, req.cache_salt, req.adapter, req.prompt_token_ids, self.block_size,
                                self.max_blocks)
            if len(self._pending) >= _PENDING_CAP:
                self._pending.clear()
            self._pending[rid] = keys
        return keys

    def _view(self, replica) -> ReplicaView:
        view = self._views.get(replica.replica_id)
        if view is None:
            view = self._views[replica.replica_id] = ReplicaView(self.fresh_s)
        view.refresh(replica.routing_stats)
        return view

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        keys = self._keys(pending_request)
        if keys:
            model = pending_request.metadata.multiplexed_model_id
            cands = [Candidate(r.replica_id, not model or model in r.multiplexed_model_ids, self._view(r).match(keys),
                               self._replica_queue_len_cache.get(r.replica_id)) for r in candidate_replicas]
            best = [self._replicas[i] for i in rank(cands, self.min_blocks, self.max_queue_gap) if i in self._replicas]
            if best:
                self.prefix_routed += 1
                return [best, *self._affinity_choice(pending_request)]
        return self._affinity_choice(pending_request)

    def _affinity_choice(self, pending_request) -> list[list]:
        """Ray's default rule (its PowerOfTwoChoicesRequestRouter): two random replicas among those multiplexed
        affinity (or locality, without an adapter) offers; the one with the shorter queue is taken."""
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ids = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            ids = self.apply_locality_routing(pending_request=pending_request)
        ids = list(ids)
        if not ids:
            return []
        return [[self._replicas[i] for i in random.sample(ids, min(2, len(ids))) if i in self._replicas]]

    async def _choose_replica_for_request(self, pending_request, *, is_retry: bool = False):
        replica = await super()._choose_replica_for_request(pending_request, is_retry=is_retry)
        keys = self._pending.pop(pending_request.metadata.internal_request_id, None)
        if keys:  # the next turn of this conversation follows it before the replica's stats say so
            view = self._views.get(replica.replica_id)
            if view is None:
                view = self._views[replica.replica_id] = ReplicaView(self.fresh_s)
            view.routed_to(keys)
        return replica

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self._views.pop(replica_id, None)
