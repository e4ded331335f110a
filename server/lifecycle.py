"""One generation call's life, shared by the gRPC face (server/service.py) and the HTTP face (server/http/).

A call: tenant slot -> quota admission -> engine sequences submitted together -> events (each face reads
them its own way: a gRPC worker thread woken by `wait_events`, an asyncio task by server.http.bridge; both
coalesce what queued up with `take`) -> `close(status)` exactly once, however the call ended.

`close` aborts the sequences that have not finished (their KV is freed at the next engine step) and settles
the bill once every sequence delivered its last event (the engine sends one for an aborted sequence too,
counting what it computed): usage and the tokens-per-minute bucket are charged the prompt tokens of every
prompt the engine scheduled and every completion token it sampled, whether the call finished, failed, or
its client left (mid-stream, unary, deadline). Validation both faces share lives here too.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from server.engine.request import (
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    RequestHandle,
    SamplingParams,
    TokenEvent,
    merge_events,
)
from server.metrics import UNRESOLVED_LABEL
from server.quotas import QuotaExceeded
from server.status import RequestError

ENGINE_CHECK_S = 0.5  # an idle consumer re-checks its client and the engine step loop this often (as HTTP)


# ---- validation (both faces) ----------------------------------------------------------------------
def check_sampling(sampling: SamplingParams, engine) -> None:
    """SamplingParams.validate against the engine's limits (InvalidRequest: INVALID_ARGUMENT / 400): the one
    sampling check of both faces (gRPC service._sampling; HTTP schemas.finalize, which names the OpenAI `param`).
    Engine._make_sequence re-applies the same rules only as a backstop for direct engine users."""
    sampling.validate(engine.config.max_new_tokens_limit, engine.args.vocab_size)


def check_prompt(ids: list[int] | tuple[int, ...], engine) -> None:
    """Token ids inside the vocabulary and room left in the context for at least one token."""
    vocab, max_len = engine.args.vocab_size, engine.max_model_len
    if not ids:
        raise InvalidRequest("the prompt is empty")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {vocab})")
    if len(ids) >= max_len:
        raise ContextTooLong(f"the prompt has {len(ids)} tokens; the context limit is {max_len}, leaving no room "
                             "to generate")


class ContextTooLong(InvalidRequest):
    """A prompt that leaves no room to generate (OpenAI's `context_length_exceeded`)."""


# ---- events -----------------------------------------------------------------------------------------
def take(handle: RequestHandle) -> TokenEvent | None:
    """Every event queued on `handle` (up to its last) merged into one, or None when none is queued: a caller
    that fell behind the engine sends one chunk per wake-up instead of one per token (same text)."""
    out: list[TokenEvent] = []
    while not handle.done and (not out or not out[-1].finished):
        try:
            out.append(handle.get(timeout=0))
        except queue.Empty:
            break
    return merge_events(out) if out else None


def failure(event: TokenEvent) -> RequestError | None:
    """The status of a sequence that ended without an answer (aborted by the server, failed by the engine)."""
    if not event.finished:
        return None
    if event.finish_reason is FinishReason.ABORT:
        return RequestError(grpc.StatusCode.UNAVAILABLE, "the request was aborted: the server is shutting down")
    if event.finish_reason is FinishReason.ERROR:
        return RequestError(grpc.StatusCode.INTERNAL, event.error or "the engine failed this request")
    return None


def drain(handles: list[RequestHandle], open_: set[int]) -> Iterator[tuple[int, TokenEvent]]:
    """(index, coalesced event) of every open handle that has one now, each taken only when the consumer asks for
    it (a consumer that stops early leaves the rest queued for the call's settlement); a finished handle leaves
    `open_`. The one draining step of both faces' waits (wait_events here, server.http.bridge.events)."""
    for i in sorted(open_):
        event = take(handles[i])
        if event is not None:
            if event.finished:
                open_.discard(i)
            yield i, event


def wait_events(handles: list[RequestHandle], wake: threading.Event, idle_s: float = ENGINE_CHECK_S
                ) -> Iterator[tuple[int, TokenEvent] | None]:
    """(index, coalesced event) as the engine delivers them, for a thread: it sleeps on `wake`, which each
    put sets (and whoever ends the call early may set too); yields None when woken without an event or
    after `idle_s`, so the caller can check its client and the engine. Ends when every handle finished."""
    for h in handles:
        h.set_listener(wake.set)
    open_ = set(range(len(handles)))
    idle = False
    try:
        while open_:
            wake.clear()  # cleared before draining: a put after this point sets it again
            got = False
            for item in drain(handles, open_):
                got = True
                yield item
            if got or not open_:
                idle = False
                continue
            if idle:  # woken (or timed out) without an event
                yield None
            wake.wait(idle_s)
            idle = True
    finally:
        for h in handles:
            h.drop_listener(wake.set)


# ---- the call ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class SequenceBill:
    """What one engine sequence consumed, from its latest event."""

    group: int  # the prompt it generates from: n choices of one prompt share (and pay) it once
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # of its prompt tokens, those served from the prefix cache
    ran: bool = False  # the engine scheduled it (a sequence aborted while waiting computed nothing)
    finished: bool = False


@dataclass(slots=True)
class Bill:
    sequences: list[SequenceBill] = field(default_factory=list)

    @property
    def ran(self) -> bool:
        return any(s.ran for s in self.sequences)

    @property
    def prompt_tokens(self) -> int:
        groups: dict[int, int] = {}
        for s in self.sequences:
            if s.ran:
                groups[s.group] = max(groups.get(s.group, 0), s.prompt_tokens)
        return sum(groups.values())

    @property
    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.sequences)

    @property
    def cached_prompt_tokens(self) -> int:
        """Prompt tokens served from the prefix cache, each prompt once (its n choices share it)."""
        groups: dict[int, int] = {}
        for s in self.sequences:
            groups[s.group] = max(groups.get(s.group, 0), s.cached_prompt_tokens)
        return sum(groups.values())


class CallServices(Protocol):
    """What a face shares with its calls (the gRPC servicer and the HTTP api both are one)."""

    engine: object  # Engine or server.scale's RemoteEngine: submit_group, abort, alive, config, args, max_model_len
    limiter: object  # server.tenants.ConcurrencyLimiter
    metrics: object  # server.metrics.ServerMetrics
    quotas: object | None  # server.quotas.Quotas
    usage: object | None  # server.usage.UsageRecorder


class Call:
    """One generation call of one tenant. Open it, `hold_slot()`, `submit()`, feed it every event with `saw()`,
    then `close()` (exactly once counts; later calls are no-ops)."""

    def __init__(self, services: CallServices, tenant, adapter_label: str = UNRESOLVED_LABEL, shared: bool = True,
                 on_close: Callable[[], None] | None = None) -> None:
        self.services = services
        self.tenant = tenant
        self.adapter_label = adapter_label  # never a caller-chosen string: an adapter name once it resolved
        self.shared = shared
        self.started = time.monotonic()
        self.status: str | None = None  # gRPC status name, once decided
        self.requests: list[GenerationRequest] = []
        self.handles: list[RequestHandle] = []
        self.bill = Bill()
        self.queue_s: float | None = None
        self.ttft_s: float | None = None
        self.quota_charged = False
        self._on_close = on_close
        self._stack = ExitStack()
        self._lock = threading.RLock()  # the engine thread settles a cancelled call's bill
        self._closed = False
        self._awaiting = False  # closed with sequences still running: their last events settle the bill
        self._settled = False

    @property
    def completion_tokens(self) -> int:
        return self.bill.completion_tokens

    @property
    def cached_prompt_tokens(self) -> int:
        return self.bill.cached_prompt_tokens

    def hold_slot(self) -> None:
        """The tenant's concurrency slot (raises TenantBusy), held until close()."""
        self._stack.enter_context(self.services.limiter.hold(self.tenant))
        gauge = self.services.metrics.in_flight.labels(self.tenant.name)
        gauge.inc()
        self._stack.callback(gauge.dec)

    def submit(self, requests: list[GenerationRequest], groups: list[int] | None = None) -> list[RequestHandle]:
        """Charge the prompts to the tenant's quota (QuotaExceeded: nothing submitted), then submit every
        sequence at once (n choices of a prompt share its KV). `groups[i]`: the prompt sequence i shares."""
        quotas = self.services.quotas
        if quotas is not None:
            try:
                quotas.admit(self.tenant.name, self.tenant.limits, sum(len(r.prompt_token_ids) for r in requests))
            except QuotaExceeded as exc:
                self.services.metrics.observe_throttled(self.tenant.name, exc.limit)
                raise
            self.quota_charged = True
        handles = self.services.engine.submit_group(requests)
        self.requests, self.handles = requests, handles
        self.bill = Bill([SequenceBill(g) for g in (groups or range(len(requests)))])
        return handles

    def saw(self, index: int, event: TokenEvent) -> None:
        """Every event of sequence `index` (its counts are cumulative: the latest one is the bill)."""
        with self._lock:
            self._record(index, event)
        if self._awaiting:  # the reader took an aborted sequence's last event: it may settle the bill
            self._poll()

    def _record(self, index: int, event: TokenEvent) -> None:
        s = self.bill.sequences[index]
        s.prompt_tokens, s.completion_tokens = event.prompt_tokens, event.completion_tokens
        s.cached_prompt_tokens = max(s.cached_prompt_tokens, event.cached_prompt_tokens)
        s.ran = s.ran or bool(event.token_ids) or event.completion_tokens > 0 or event.queue_s is not None
        s.finished = s.finished or event.finished
        if self.queue_s is None and event.queue_s is not None:
            self.queue_s = event.queue_s
        if self.ttft_s is None and event.ttft_s is not None:
            self.ttft_s = event.ttft_s

    def close(self, status: str | None = None) -> None:
        """End the call (idempotent): abort what runs, free the slot, count the request, settle the bill."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = [i for i, s in enumerate(self.bill.sequences) if not s.finished]
        self.status = self.status or status or grpc.StatusCode.CANCELLED.name
        engine = self.services.engine
        for i in pending:
            engine.abort(self.requests[i].request_id)
        self._stack.close()
        if self._on_close is not None:
            self._on_close()
        bill = self.bill
        self.services.metrics.observe_request(  # the tokens of aborted sequences come with their last events
            self.tenant.name, self.adapter_label, self.status, queue_s=self.queue_s, ttft_s=self.ttft_s,
            total_s=time.monotonic() - self.started, shared=self.shared,
            prompt_tokens=0 if pending else bill.prompt_tokens,
            completion_tokens=0 if pending else bill.completion_tokens)
        if not pending:
            self._settle(count_tokens=False)
            return
        for i in pending:  # the aborted sequences' last events settle the bill (on the engine thread)
            self.handles[i].set_listener(self._poll)
        self._awaiting = True
        self._poll()

    def _poll(self) -> None:
        with self._lock:
            if self._settled:
                return
            for i, s in enumerate(self.bill.sequences):
                while not s.finished:
                    try:
                        event = take(self.handles[i])
                    except Exception:  # noqa: BLE001 - a remote handle's failure (server.scale) ends it
                        s.finished = True
                        break
                    if event is None:
                        break
                    self._record(i, event)
            done = all(s.finished for s in self.bill.sequences)
            if not done and self.services.engine.alive:
                return
        self._settle(count_tokens=True)

    def _settle(self, count_tokens: bool) -> None:
        with self._lock:
            if self._settled:
                return
            self._settled = True
        for h in self.handles:
            h.drop_listener(self._poll)
        bill = self.bill
        if count_tokens:
            self.services.metrics.observe_tokens(self.tenant.name, self.adapter_label, bill.prompt_tokens,
                                                 bill.completion_tokens, shared=self.shared)
        if not bill.ran:
            return
        quotas, usage = self.services.quotas, self.services.usage
        if self.quota_charged and quotas is not None:
            quotas.charge_completion(self.tenant.name, self.tenant.limits, bill.completion_tokens)
        if usage is not None:
            adapter = self.adapter_label if self.adapter_label != UNRESOLVED_LABEL else ""
            usage.record(self.tenant.name, adapter, bill.prompt_tokens, bill.completion_tokens,
                         cached_prompt_tokens=bill.cached_prompt_tokens)
