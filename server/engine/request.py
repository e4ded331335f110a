"""What a caller hands the engine and what comes back.

`GenerationRequest` in -> `Engine.submit()` -> `RequestHandle` out, which yields `TokenEvent`s
(thread-safe; the step loop produces, a gRPC worker thread consumes).
"""

from __future__ import annotations

import math
import queue
import time
from dataclasses import dataclass, field
from enum import StrEnum


class InvalidRequest(ValueError):
    """The request itself is wrong (maps to INVALID_ARGUMENT)."""


class UnknownAdapterRequest(InvalidRequest):
    """The request names an adapter that is not registered (or was just deleted); served as NOT_FOUND."""


class QueueFull(RuntimeError):
    """The waiting queue is at its limit (maps to RESOURCE_EXHAUSTED)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new work (maps to UNAVAILABLE)."""


class FinishReason(StrEnum):
    STOP = "stop"  # EOS token or a stop string
    LENGTH = "length"  # max_new_tokens or the context limit
    ABORT = "abort"  # cancelled by the caller (client gone, deadline)
    ERROR = "error"  # the engine failed this sequence (message in TokenEvent.error)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-sequence sampling. temperature == 0 means greedy (top_k/top_p ignored)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 = off
    seed: int | None = None  # reproducible per request when set
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def validate(self, max_new_tokens_limit: int) -> None:
        if not 0 < self.max_new_tokens <= max_new_tokens_limit:
            raise InvalidRequest(
                f"max_new_tokens must be in [1, {max_new_tokens_limit}], got {self.max_new_tokens}"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequest(f"seed must be in [0, 2**63), got {self.seed}")
        if len(self.stop) > 16:
            raise InvalidRequest(f"at most 16 stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not s:
                raise InvalidRequest("stop strings must be non-empty")
            if len(s) > 256:
                raise InvalidRequest("stop strings must be at most 256 characters")


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # adapter key as the adapter provider knows it; None = base model
    tenant: str = "local"
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One engine step's output for one request. The last event has finished=True."""

    request_id: str
    token_ids: tuple[int, ...]  # tokens produced in this step (usually one)
    text: str  # detokenized text delta; never splits a multi-byte character
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    adapter_version: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float | None = None  # arrival -> first scheduled (set on the first event)
    ttft_s: float | None = None  # arrival -> first token (set on the first event)


class RequestHandle:
    """Consumer side of one request. Iterate it (blocking) or call get(timeout)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._events: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        self.done = False

    def put(self, event: TokenEvent) -> None:  # called by the engine thread
        self._events.put(event)

    def get(self, timeout: float | None = None) -> TokenEvent:
        """Next event; raises queue.Empty on timeout."""
        event = self._events.get(timeout=timeout)
        if event.finished:
            self.done = True
        return event

    def __iter__(self):
        while not self.done:
            yield self.get()
