"""Several choices of one prompt (`n`): the prompt is computed once and its KV blocks are shared.

`Engine.submit_group` hands the sequences of one prompt here: the first (the parent) is queued as usual,
the others (its siblings) wait. In the step whose forward completes the parent's prompt, before its first
token is sampled, each sibling forks from it: it shares the parent's full prompt blocks (never written
again), gets a copy of the partially filled tail block, pins the same adapter slot, and joins the running
batch with its context computed; the step then samples its first token from the parent's logits row with
the sibling's own generator (so it equals a single request with the sibling's seed). A sibling that cannot
fork (the running limit, no free block for the tail, its adapter not pinnable) and the siblings of a parent
that ends before its prompt completes are queued as ordinary sequences (admitted through the prefix cache, they
reuse whatever full blocks of the prompt were computed).
"""

from __future__ import annotations

from server.engine.kv_cache import KVCache
from server.engine.prefix_cache import PrefixCache
from server.engine.scheduler import Scheduler
from server.engine.sequence import SeqStatus, Sequence


class SiblingForks:
    def __init__(self) -> None:
        self._held: dict[str, list[Sequence]] = {}  # parent request_id -> its waiting siblings

    @property
    def held(self) -> int:
        return sum(len(v) for v in self._held.values())

    def group(self, seqs: list[Sequence]) -> list[Sequence]:
        """The sequences to queue; a later sequence with an earlier one's prompt and adapter is held as its sibling."""
        parents: dict[tuple, Sequence] = {}
        queued = []
        for seq in seqs:
            req = seq.request
            key = (req.prompt_token_ids, req.adapter, req.parts, req.tenant, req.cache_salt)  # one cache chain too
            parent = parents.get(key)
            if parent is None:
                parents[key] = seq
                queued.append(seq)
            else:
                self._held.setdefault(parent.request_id, []).append(seq)
        return queued

    def drop(self, seq: Sequence) -> list[Sequence]:
        """`seq` ends: if it was held, forget it; if it was a parent, its held siblings (to queue as ordinary)."""
        for siblings in self._held.values():
            if seq in siblings:
                siblings.remove(seq)
                return []
        return self._held.pop(seq.request_id, [])

    def fork(self, sampled: list[Sequence], kv: KVCache, scheduler: Scheduler, pool) -> list[tuple[Sequence, int]]:
        """(sibling, row of `sampled` whose logits it samples from) for every sibling forked in this step."""
        forked: list[tuple[Sequence, int]] = []
        for row, parent in enumerate(sampled):
            if parent.output_ids or parent.request_id not in self._held:
                continue  # not the step that completes this parent's prompt
            for sibling in self._held.pop(parent.request_id):
                if self._fork_one(parent, sibling, kv, scheduler, pool):
                    forked.append((sibling, row))
                else:
                    scheduler.add(sibling)
        return forked

    @staticmethod
    def _fork_one(parent: Sequence, sibling: Sequence, kv: KVCache, scheduler: Scheduler, pool) -> bool:
        computed = parent.context_len  # every context entry of the prompt, no token sampled yet
        full, partial = divmod(computed, kv.block_size)
        if len(scheduler.running) >= scheduler.cfg.max_running or (partial and not kv.can_allocate(1)):
            return False
        if sibling.request.parts:  # a composition's siblings run as ordinary sequences (pinning every part)
            return False
        key = sibling.request.adapter
        lease = None
        if key is not None:
            try:
                lease = pool.acquire(key)  # the parent pins the same slot: this only adds a pin
            except Exception:  # noqa: BLE001 - gone since submit: the ordinary path reports it
                return False
            if lease is None:
                return False
        sibling.blocks = kv.share(parent.blocks[:full]) + ([kv.copy_block(parent.blocks[full])] if partial else [])
        sibling.num_computed = computed
        PrefixCache.fork(parent, sibling, full)
        if lease is not None:
            sibling.lease, sibling.adapter_version = lease, lease.version
        sibling.status = SeqStatus.RUNNING
        sibling.mark_scheduled()
        scheduler.running.append(sibling)
        scheduler.waiting.on_admit(sibling, 0)  # counted as running; its prompt was charged with the parent's
        return True
