"""Which sequences run this step, and how many of their tokens. The scheduler decides alone: it calls
no engine code, and hands back what it could not admit for the engine to fail.

Running sequences go first (decodes and unfinished prefill chunks), then waiting ones are admitted
in the queue policy's order (FCFS, or VTC across tenants: server.engine.fairness) while the step's
token budget, the running limit, the KV budget and the adapter pin allow. A prompt
larger than the remaining budget is prefilled in chunks. When the KV cache cannot grow a running
sequence, one is preempted (FCFS: the newest; VTC: the newest of the tenant most ahead; its blocks
freed, it goes back to the front of the queue and is recomputed later): a request that does not fit
waits, it never crashes the engine. Under VTC a request whose tenant is below its fair share of the batch
may also preempt a sequence of a tenant above its share (fair-share preemption, server.engine.fairness).
Admission goes through the prefix cache (server.engine.prefix_cache): a sequence takes the cached blocks of
its longest cached prefix and computes only the rest (a re-admitted preempted sequence too); the KV budget
counts cached-but-unreferenced blocks as free, and VTC charges the prompt tokens it computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from server.config import EngineConfig
from server.engine.fairness import WaitingQueue
from server.engine.kv_cache import KVCache
from server.engine.prefix_cache import PrefixCache
from server.engine.sequence import SeqStatus, Sequence


class Admission(Enum):
    ADMITTED = "admitted"
    NOT_NOW = "not_now"  # its adapter slot is busy or still loading: try the next request
    FAILED = "failed"  # it can never run (adapter gone or unreadable): the engine fails it


PinAdapter = Callable[[Sequence], tuple[Admission, str | None]]  # after KV allocation; the str says why it FAILED
UnpinAdapter = Callable[[Sequence], None]


@dataclass(slots=True)
class StepPlan:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens computed this step)
    failed: list[tuple[Sequence, str]] = field(default_factory=list)  # taken off the queue (KV freed), and why


class Scheduler:
    def __init__(self, cfg: EngineConfig, kv: KVCache, pin: PinAdapter, unpin: UnpinAdapter,
                 prefix: PrefixCache | None = None) -> None:
        self.cfg = cfg
        self.kv = kv
        self.prefix = prefix or PrefixCache(kv, enabled=False)
        self.pin = pin
        self.unpin = unpin
        self.waiting = WaitingQueue(cfg.scheduling, cfg.w_in, cfg.w_out)  # FCFS or VTC (server.engine.fairness)
        self.running: list[Sequence] = []
        self.preemptions = 0  # every preemption (KV pressure and fair share)
        self.fair_preemptions = 0  # of which fair-share ones (VTC, EngineConfig.fair_preemption)

    def add(self, seq: Sequence) -> None:
        self.waiting.push(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        if self.cfg.fair_preemption:
            self._make_room_fairly()
        budget = self._continue_running(plan, self.cfg.max_batch_tokens)
        self._admit_waiting(plan, budget)
        return plan

    def _continue_running(self, plan: StepPlan, budget: int) -> int:
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted below while making room for an older sequence
            n = min(seq.pending, budget)
            if not self._grow(seq, seq.num_computed + n, {s for s, _ in plan.scheduled}):
                continue
            plan.scheduled.append((seq, n))
            budget -= n
        return budget

    def _admit_waiting(self, plan: StepPlan, budget: int) -> None:
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_running:
            seq = self.waiting.pop_next()
            hits = self.prefix.match(seq)
            if not self.kv.can_allocate(self.prefix.cost(seq, hits)):
                skipped.append(seq)
                break  # FIFO for KV: later (smaller) requests don't overtake a waiting large one
            cached = self.prefix.admit(seq, hits)
            admission, why = self.pin(seq)
            if admission is not Admission.ADMITTED:
                self._release(seq)
                if admission is Admission.FAILED:
                    plan.failed.append((seq, why or "the request could not be admitted"))
                else:
                    skipped.append(seq)
                continue
            seq.status = SeqStatus.RUNNING
            self.waiting.on_admit(seq, self.prefix.account(seq, cached))  # 0 for a re-admission
            seq.mark_scheduled()
            self.running.append(seq)
            n = min(seq.pending, budget)
            plan.scheduled.append((seq, n))
            budget -= n
        for seq in reversed(skipped):
            self.waiting.push_front(seq)

    def _make_room_fairly(self) -> None:
        """VTC fair-share preemption (server.engine.fairness): preempt over-allowance tenants' sequences until
        the next waiting request fits the running limit and the KV budget, or no victim qualifies."""
        seq = self.waiting.peek_next()
        if seq is None:
            return
        while (len(self.running) >= self.cfg.max_running
               or not self.kv.can_allocate(self.prefix.cost(seq, self.prefix.match(seq)))):
            victim = self.waiting.fair_share_victim(seq.request.tenant, self.running, self.cfg.max_running)
            if victim is None:
                return
            self.preempt(victim)
            self.fair_preemptions += 1

    def _grow(self, seq: Sequence, context_len: int, keep: set[Sequence]) -> bool:
        """Make room for `seq` by preempting sequences not scheduled in this step (the queue policy picks)."""
        need = self.kv.blocks_needed(len(seq.blocks), context_len)
        while not self.kv.can_allocate(need):
            victim = self.waiting.preemption_victim([s for s in self.running if s is not seq and s not in keep])
            if victim is None:
                return False
            self.preempt(victim)
        seq.blocks += self.kv.allocate(need)
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.waiting.on_release(seq)
        self._release(seq)
        self.unpin(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.push_front(seq)
        self.preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished, aborted or failed) wherever it is and free what it holds."""
        if seq in self.running:
            self.running.remove(seq)
            self.waiting.on_release(seq)
            self.unpin(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        """Give back `seq`'s blocks (keyed ones stay cached); its context is computed again if it runs again."""
        self.kv.free(seq.blocks)
        self.prefix.release(seq)
        seq.num_computed = 0
