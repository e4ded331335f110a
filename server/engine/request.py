"""What a caller hands the engine and what comes back.

`GenerationRequest` in -> `Engine.submit()` -> `RequestHandle` out, which yields `TokenEvent`s
(thread-safe; the step loop produces, a gRPC worker thread consumes).
"""

from __future__ import annotations

import dataclasses
import math
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.structured.constraint import Constraint

GREEDY_EPSILON = 1e-5  # temperatures below this are greedy (dividing by them overflows fp32)
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024


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
    """Per-sequence sampling. temperature below GREEDY_EPSILON means greedy (top_k/top_p/min_p ignored).

    Penalties follow vLLM: presence / frequency over the sequence's output tokens (OpenAI semantics),
    repetition (CTRL) over prompt and output tokens; logit_bias is added to the model's logits.
    logprobs / top_logprobs are of the model's raw distribution (vLLM's default `raw_logprobs`).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 = off
    seed: int | None = None  # reproducible per request when set
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0  # in [0, 1]; 0 = off
    presence_penalty: float = 0.0  # in [-2, 2]
    frequency_penalty: float = 0.0  # in [-2, 2]
    repetition_penalty: float = 1.0  # in (0, 100]; 1 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    min_tokens: int = 0  # EOS (and stop strings) suppressed until this many tokens were generated
    logprobs: bool = False  # report the sampled token's logprob
    top_logprobs: int = 0  # also report this many most likely alternatives, in [0, MAX_TOP_LOGPROBS]

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    def validate(self, max_new_tokens_limit: int, vocab_size: int | None = None) -> None:
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
        if not math.isfinite(self.min_p) or not 0 <= self.min_p <= 1:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not -2 <= value <= 2:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {value}")
        if not math.isfinite(self.repetition_penalty) or not 0 < self.repetition_penalty <= 100:
            raise InvalidRequest(f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InvalidRequest(
                f"min_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_tokens}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequest(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
        for token, bias in self.logit_bias:
            if vocab_size is not None and not 0 <= token < vocab_size:
                raise InvalidRequest(f"logit_bias token id {token} is outside the vocabulary [0, {vocab_size})")
            if not math.isfinite(bias) or not -100 <= bias <= 100:
                raise InvalidRequest(f"logit_bias value for token {token} must be in [-100, 100], got {bias}")


@dataclass(frozen=True, slots=True)
class AdapterPart:
    """One adapter of a composition (server/engine/composition.py)."""

    key: str  # adapter key as the adapter provider knows it
    weight: float = 1.0  # multiplies the adapter's delta (its scale alpha/r)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # adapter key as the adapter provider knows it; None = base model
    tenant: str = "local"
    arrival_time: float = field(default_factory=time.monotonic)
    # the output's constraint (server.structured; a plain value, so a request pickles to a Ray replica); the
    # API faces compile it before submit (the engine then finds it in its compile cache); None = free text
    constraint: Constraint | None = None
    cache_salt: str | None = None  # narrows the prefix cache's namespace (the tenant) to requests with this salt
    # a composition of LoRA adapters with a weight each (one part: a weighted adapter); set instead of `adapter`
    parts: tuple[AdapterPart, ...] = ()

    @property
    def adapter_keys(self) -> tuple[str, ...]:
        """Every adapter key the request uses (reserved at submit, released when it ends)."""
        if self.parts:
            return tuple(p.key for p in self.parts)
        return () if self.adapter is None else (self.adapter,)


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One engine step's output for one request. The last event has finished=True."""

    request_id: str
    token_ids: tuple[int, ...]  # tokens produced in this step (usually one)
    text: str  # detokenized text delta; never splits a multi-byte character
    # per token of token_ids, when the request asked for logprobs: the sampled token's logprob (raw model
    # distribution) and its top alternatives [(token id, logprob)], most likely first
    logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    adapter_version: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, those served from the prefix cache (not computed)
    queue_s: float | None = None  # arrival -> first scheduled (set on the first event)
    ttft_s: float | None = None  # arrival -> first token (set on the first event)


def merge_events(events: list[TokenEvent]) -> TokenEvent:
    """Consecutive events of one request as one (tokens, text and logprobs concatenated; the first
    event's timings, the last one's state): what a consumer that fell behind the engine sends."""
    if len(events) == 1:
        return events[0]
    first, last = events[0], events[-1]
    return dataclasses.replace(
        last, token_ids=tuple(t for e in events for t in e.token_ids), text="".join(e.text for e in events),
        logprobs=tuple(x for e in events for x in e.logprobs),
        top_logprobs=tuple(x for e in events for x in e.top_logprobs),
        queue_s=first.queue_s if first.queue_s is not None else last.queue_s,
        ttft_s=first.ttft_s if first.ttft_s is not None else last.ttft_s,
    )


class RequestHandle:
    """Consumer side of one request. Iterate it (blocking) or call get(timeout)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._events: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        self.done = False
        self._listener: Callable[[], None] | None = None

    def put(self, event: TokenEvent) -> None:  # called by the engine thread
        self._events.put(event)
        listener = self._listener
        if listener is not None:
            listener()

    def set_listener(self, listener: Callable[[], None] | None) -> None:
        """Call `listener()` (from the engine thread) after each put, e.g. to wake an asyncio consumer;
        events queued before it was set are not signalled: check with get(timeout=0) after setting it."""
        self._listener = listener

    def drop_listener(self, listener: Callable[[], None]) -> None:
        """Unset `listener` if it is still the one set (another consumer may have replaced it since)."""
        if self._listener == listener:
            self._listener = None

    def get(self, timeout: float | None = None) -> TokenEvent:
        """Next event; raises queue.Empty on timeout."""
        event = self._events.get(timeout=timeout)
        if event.finished:
            self.done = True
        return event

    def __iter__(self):
        while not self.done:
            yield self.get()
