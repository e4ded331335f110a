"""The waiting queue and its policy: FCFS, or the Virtual Token Counter (VTC) across tenants.

VTC (Sheng et al., "Fairness in Serving Large Language Models", OSDI'24): every tenant has a counter.
Admission takes the head of the backlogged tenant (one with waiting sequences) whose counter is the
smallest; within a tenant the order stays FIFO. A tenant's counter grows by `w_in * prompt tokens` when
a sequence is first admitted (the prompt tokens it computes: those the prefix cache serves are free) and by
`w_out` per generated token, divided by the tenant's weight. When
a tenant becomes backlogged (its queue goes from empty to non-empty on a new arrival) its counter is
lifted to max(its own, the smallest counter among backlogged tenants) -- or, when no tenant is
backlogged, to the counter of the last tenant whose backlog emptied -- so idle time banks no credit.
Preemption evicts from the tenant that is most ahead.

Fair-share preemption (VTC only, beyond the paper; `EngineConfig.fair_preemption`): the paper's VTC orders
admission but cannot admit into a full batch, so a light tenant's new request waits for one of a flooding
tenant's running sequences to finish. When the next request to admit is blocked by the running limit or the
KV budget, its tenant T runs fewer sequences than its slot allowance `ceil(max_running * w_T / sum w)` (over
tenants with running or waiting sequences), and some tenant V runs more than its own allowance with a
counter at least as large, the scheduler preempts V's running sequence with the least computed work. The two strict
inequalities around the same allowances mean a preemption never triggers one back (no ping-pong).

`service` is what each tenant actually received, in weighted tokens (`w_in * prompt + w_out * generated`,
not divided by the weight): the quantity the VTC bound is stated in, kept for both policies (metrics,
tests, benchmarks).

Thread-safety: mutated by the engine thread only; `snapshot()` is safe to call from a scrape thread.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from server.engine.sequence import Sequence

POLICIES = ("fcfs", "vtc")


@dataclass(frozen=True, slots=True)
class TenantService:
    counter: float  # VTC virtual counter (lifted; divided by the weight)
    service: float  # weighted tokens received: w_in * prompt + w_out * generated
    prompt_tokens: int
    generated_tokens: int
    waiting: int


class WaitingQueue:
    """The scheduler's waiting sequences, ordered by `policy` ("fcfs" or "vtc")."""

    def __init__(self, policy: str = "fcfs", w_in: float = 1.0, w_out: float = 2.0,
                 weights: dict[str, float] | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.w_in = w_in
        self.w_out = w_out
        self.weights: dict[str, float] = dict(weights or {})  # tenant -> weight (> 0); missing = 1
        self._fifo: deque[Sequence] = deque()  # fcfs order
        self._by_tenant: dict[str, deque[Sequence]] = {}  # vtc: per-tenant FIFO (only non-empty ones)
        self.counters: dict[str, float] = {}
        self.service: dict[str, float] = {}
        self._prompt: dict[str, int] = {}
        self._generated: dict[str, int] = {}
        self._last_left = 0.0  # counter of the last tenant whose backlog emptied
        self._n = 0  # waiting sequences (read by other threads: Engine.submit, stats)
        self._waiting: dict[str, int] = {}  # tenant -> waiting sequences
        self._running: dict[str, int] = {}  # tenant -> running sequences (on_admit / on_release)

    # ---- queue ---------------------------------------------------------------------------------
    def push(self, seq: Sequence) -> None:
        """A new arrival (back of its tenant's queue); lifts the tenant's counter if it becomes backlogged."""
        self._count(seq, 1)
        if self.policy == "fcfs":
            self._fifo.append(seq)
            return
        tenant = _tenant(seq)
        queue = self._by_tenant.get(tenant)
        if queue is None:
            self._lift(tenant)
            queue = self._by_tenant[tenant] = deque()
        queue.append(seq)

    def push_front(self, seq: Sequence) -> None:
        """A sequence going back (preempted, or not admitted this step): the front of its tenant's queue,
        no counter lift (it was already counted as waiting or running)."""
        self._count(seq, 1)
        if self.policy == "fcfs":
            self._fifo.appendleft(seq)
            return
        self._by_tenant.setdefault(_tenant(seq), deque()).appendleft(seq)

    def pop_next(self) -> Sequence | None:
        """FCFS: the oldest. VTC: the head of the backlogged tenant with the smallest counter."""
        if not self:
            return None
        if self.policy == "fcfs":
            seq = self._fifo.popleft()
            self._count(seq, -1)
            return seq
        tenant = min(self._by_tenant, key=self._rank)
        queue = self._by_tenant[tenant]
        seq = queue.popleft()
        self._count(seq, -1)
        if not queue:
            del self._by_tenant[tenant]
            self._last_left = self.counters.get(tenant, 0.0)
        return seq

    def peek_next(self) -> Sequence | None:
        """What pop_next() would return, left in the queue."""
        if not self:
            return None
        if self.policy == "fcfs":
            return self._fifo[0]
        return self._by_tenant[min(self._by_tenant, key=self._rank)][0]

    def _count(self, seq: Sequence, delta: int) -> None:
        tenant = _tenant(seq)
        self._waiting[tenant] = self._waiting.get(tenant, 0) + delta
        self._n += delta

    def _rank(self, tenant: str) -> tuple[float, int, float]:
        """Smallest counter first; on a tie (a lifted tenant starts level with the smallest backlogged counter)
        the tenant running fewer sequences, then the older head."""
        return (self.counters.get(tenant, 0.0), self._running.get(tenant, 0),
                self._by_tenant[tenant][0].request.arrival_time)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of the queue (ValueError when it is not waiting)."""
        if self.policy == "fcfs":
            self._fifo.remove(seq)
            self._count(seq, -1)
            return
        queue = self._by_tenant.get(_tenant(seq))
        if queue is None:
            raise ValueError(f"{seq.request_id} is not waiting")
        queue.remove(seq)
        self._count(seq, -1)
        if not queue:
            del self._by_tenant[_tenant(seq)]

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return bool(self._fifo or self._by_tenant)

    def __contains__(self, seq: object) -> bool:
        if self.policy == "fcfs":
            return seq in self._fifo
        queue = self._by_tenant.get(_tenant(seq)) if isinstance(seq, Sequence) else None
        return queue is not None and seq in queue

    def __iter__(self) -> Iterator[Sequence]:
        """Every waiting sequence (FCFS: in order; VTC: tenant by tenant, FIFO within each)."""
        if self.policy == "fcfs":
            return iter(list(self._fifo))
        return iter([s for q in list(self._by_tenant.values()) for s in q])

    # ---- counters ------------------------------------------------------------------------------
    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def set_weights(self, weights: dict[str, float]) -> None:
        """New tenant weights (a tenants-file reload); counters keep their values."""
        self.weights = dict(weights)

    def on_admit(self, seq: Sequence, prompt_tokens: int) -> None:
        """A sequence was admitted: charge its prompt (the scheduler passes 0 on a re-admission)."""
        tenant = _tenant(seq)
        self._running[tenant] = self._running.get(tenant, 0) + 1
        self._charge(tenant, self.w_in * prompt_tokens)
        self._prompt[tenant] = self._prompt.get(tenant, 0) + prompt_tokens

    def on_release(self, seq: Sequence) -> None:
        """A running sequence left the batch (finished, aborted or preempted)."""
        tenant = _tenant(seq)
        left = self._running.get(tenant, 0) - 1
        if left > 0:
            self._running[tenant] = left
        else:
            self._running.pop(tenant, None)

    def on_tokens(self, seq: Sequence, n: int) -> None:
        """`n` tokens were generated for `seq`."""
        tenant = _tenant(seq)
        self._charge(tenant, self.w_out * n)
        self._generated[tenant] = self._generated.get(tenant, 0) + n

    def most_ahead_tenant(self, tenants: Iterable[str]) -> str | None:
        """The tenant among `tenants` with the largest counter (ties: the first given)."""
        best: str | None = None
        for t in tenants:
            if best is None or self.counters.get(t, 0.0) > self.counters.get(best, 0.0):
                best = t
        return best

    def preemption_victim(self, candidates: list[Sequence]) -> Sequence | None:
        """Which running sequence to preempt (candidates oldest first): FCFS the newest; VTC the newest of
        the tenant that is most ahead."""
        if not candidates:
            return None
        if self.policy == "fcfs":
            return candidates[-1]
        tenant = self.most_ahead_tenant(dict.fromkeys(_tenant(s) for s in candidates))
        return next(s for s in reversed(candidates) if _tenant(s) == tenant)

    def fair_share_victim(self, tenant: str, running: list[Sequence], max_running: int) -> Sequence | None:
        """VTC fair-share preemption (module docstring): the running sequence to preempt so that `tenant`'s
        next request can be admitted, or None when `tenant` is at its allowance or no tenant is over its own
        with a counter at least as large. `running` is oldest first."""
        if self.policy != "vtc":
            return None
        by_tenant: dict[str, list[Sequence]] = {}
        for s in running:
            by_tenant.setdefault(_tenant(s), []).append(s)
        active = set(by_tenant) | set(self._by_tenant) | {tenant}
        total = sum(self.weight(t) for t in active)

        def allowance(t: str) -> int:
            return max(1, math.ceil(max_running * self.weight(t) / total - 1e-9))

        if len(by_tenant.get(tenant, ())) >= allowance(tenant):
            return None
        own = self.counters.get(tenant, 0.0)
        over = [t for t, seqs in by_tenant.items()
                if t != tenant and len(seqs) > allowance(t) and self.counters.get(t, 0.0) >= own]
        victim_tenant = self.most_ahead_tenant(over)
        if victim_tenant is None:
            return None
        seqs = by_tenant[victim_tenant]
        return min(reversed(seqs), key=lambda s: s.num_computed)  # least work lost; ties: the newest

    def snapshot(self) -> dict[str, TenantService]:
        """Per-tenant counters and service so far (any thread; copies taken atomically under the GIL)."""
        waiting, counters, service = dict(self._waiting), dict(self.counters), dict(self.service)
        prompt, generated = dict(self._prompt), dict(self._generated)
        return {t: TenantService(counters.get(t, 0.0), service.get(t, 0.0), prompt.get(t, 0), generated.get(t, 0),
                                 waiting.get(t, 0)) for t in sorted(set(service) | set(counters) | set(waiting))}

    def _charge(self, tenant: str, cost: float) -> None:
        self.service[tenant] = self.service.get(tenant, 0.0) + cost
        self.counters[tenant] = self.counters.get(tenant, 0.0) + cost / self.weight(tenant)

    def _lift(self, tenant: str) -> None:
        own = self.counters.get(tenant, 0.0)
        backlogged = [self.counters.get(t, 0.0) for t in self._by_tenant]
        floor = min(backlogged) if backlogged else self._last_left
        self.counters[tenant] = max(own, floor)


def _tenant(seq: Sequence) -> str:
    return seq.request.tenant
