"""One HTTP generation call's life: its engine sequences, tenant slot, quota, usage, metrics, cleanup exactly once.

Whatever ends the call (done, error, client gone mid-stream, server shutting down), `close()` aborts
the sequences that have not finished (their KV is freed at the next engine step), releases the tenant's
concurrency slot and records the request in the shared metrics, like the gRPC path does.
"""

from __future__ import annotations

import time
from contextlib import ExitStack

from starlette.responses import StreamingResponse

from server.engine.request import GenerationRequest, RequestHandle
from server.metrics import UNRESOLVED_LABEL
from server.quotas import QuotaExceeded


class Call:
    def __init__(self, api, tenant, adapter_label: str) -> None:
        self.api = api
        self.tenant = tenant
        self.adapter_label = adapter_label
        self.started = time.monotonic()
        self.status: str | None = None  # gRPC status name for the metrics (OK, CANCELLED, ...)
        self.requests: list[GenerationRequest] = []
        self.handles: list[RequestHandle] = []
        self.finished: set[int] = set()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached: dict[int, int] = {}  # request index -> its prompt tokens served from the prefix cache
        self.queue_s: float | None = None
        self.ttft_s: float | None = None
        self.quota_charged = False
        self.reached_engine = False  # an event came back: tokens were consumed
        self._stack = ExitStack()
        self._closed = False
        api.active_calls += 1

    def hold_slot(self) -> None:
        """The tenant's concurrency slot (raises TenantBusy), held until close()."""
        self._stack.enter_context(self.api.limiter.hold(self.tenant))
        gauge = self.api.metrics.in_flight.labels(self.tenant.name)
        gauge.inc()
        self._stack.callback(gauge.dec)

    def submit(self, requests: list[GenerationRequest]) -> None:
        """Submit every sequence (n choices, several prompts) before waiting on any; all or none. The prompt
        tokens are charged to the tenant's quota first (QuotaExceeded: 429, nothing submitted)."""
        quotas = self.api.quotas
        if quotas is not None:
            try:
                quotas.admit(self.tenant.name, self.tenant.limits, sum(len(r.prompt_token_ids) for r in requests))
            except QuotaExceeded as exc:
                self.api.metrics.observe_throttled(self.tenant.name, exc.limit)
                raise
            self.quota_charged = True
        self.requests = requests
        self.handles = self.api.engine.submit_group(requests)  # n choices of a prompt share its KV

    def observe(self, index: int, event) -> None:
        self.reached_engine = True
        if self.queue_s is None and event.queue_s is not None:
            self.queue_s = event.queue_s
        if self.ttft_s is None and event.ttft_s is not None:
            self.ttft_s = event.ttft_s
        if event.finished:
            self.finished.add(index)
            self.completion_tokens += event.completion_tokens
            self.prompt_tokens += event.prompt_tokens
            self.cached[index] = event.cached_prompt_tokens

    def cached_prompt_tokens(self, n: int) -> int:
        """Prompt tokens served from the prefix cache, each prompt once (its `n` choices share it)."""
        return sum(self.cached.get(i, 0) for i in range(0, len(self.requests), n))

    def close(self, status: str | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self.status = self.status or status or "CANCELLED"
        for i, req in enumerate(self.requests[: len(self.handles)]):
            if i not in self.finished:
                self.api.engine.abort(req.request_id)
        self._stack.close()
        self.api.active_calls -= 1
        self._account()
        self.api.metrics.observe_request(
            self.tenant.name, self.adapter_label, self.status, prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens, queue_s=self.queue_s, ttft_s=self.ttft_s,
            total_s=time.monotonic() - self.started)


    def _account(self) -> None:
        """As the gRPC path: completion tokens against the tokens-per-minute bucket, and a usage record."""
        if not self.reached_engine:
            return
        if self.quota_charged and self.api.quotas is not None:
            self.api.quotas.charge_completion(self.tenant.name, self.tenant.limits, self.completion_tokens)
        if self.api.usage is not None:
            adapter = self.adapter_label if self.adapter_label != UNRESOLVED_LABEL else ""
            self.api.usage.record(self.tenant.name, adapter, self.prompt_tokens, self.completion_tokens)


class EventStream(StreamingResponse):
    """An SSE response that closes its Call however the stream ends, even if the body never started
    (a client that disconnects before the first chunk)."""

    def __init__(self, body, call: Call) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.call = call

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.call.close()
