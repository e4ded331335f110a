"""One HTTP generation call's life: its engine sequences, tenant slot, metrics, and cleanup exactly once.

Whatever ends the call (done, error, client gone mid-stream, server shutting down), `close()` aborts
the sequences that have not finished (their KV is freed at the next engine step), releases the tenant's
concurrency slot and records the request in the shared metrics, like the gRPC path does.
"""

from __future__ import annotations

import time
from contextlib import ExitStack

from starlette.responses import StreamingResponse

from server.engine.request import GenerationRequest, RequestHandle


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
        self.queue_s: float | None = None
        self.ttft_s: float | None = None
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
        """Submit every sequence (n choices, several prompts) before waiting on any; all or none."""
        self.requests = requests
        for req in requests:
            self.handles.append(self.api.engine.submit(req))

    def observe(self, index: int, event) -> None:
        if self.queue_s is None and event.queue_s is not None:
            self.queue_s = event.queue_s
        if self.ttft_s is None and event.ttft_s is not None:
            self.ttft_s = event.ttft_s
        if event.finished:
            self.finished.add(index)
            self.completion_tokens += event.completion_tokens
            self.prompt_tokens += event.prompt_tokens

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
        self.api.metrics.observe_request(
            self.tenant.name, self.adapter_label, self.status, prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens, queue_s=self.queue_s, ttft_s=self.ttft_s,
            total_s=time.monotonic() - self.started)


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
