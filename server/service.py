"""The Inference servicer: proto <-> engine objects, validation, tokenization, status codes. No torch here.

A request's way through: authenticated tenant (server.auth) -> `_prepare` (exactly one of prompt /
messages / token_ids, sampling values, stop strings, adapter resolved through the registry, chat
template) -> per-tenant concurrency slot -> quotas (server.quotas: requests and tokens per minute) ->
`Engine.submit` -> TokenEvents -> response or chunks -> usage record (server.usage).
A cancelled call or an expired deadline aborts the engine sequence (its KV is freed at the next step).
"""

from __future__ import annotations

import logging
import queue
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from server import grpc_messages as msg
from server.auth import caller
from server.clip import clip
from server.compose_api import PartRef, PartSpec, ResolvedParts, resolve_parts
from server.engine.request import (
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    merge_events,
)
from server.metrics import UNRESOLVED_LABEL, ServerMetrics
from server.prompting import PromptTokenizer
from server.quotas import QuotaExceeded, Quotas
from server.status import RequestError, invalid, message_of, status_of
from server.tenants import ConcurrencyLimiter, Tenant
from switchboard.v1 import inference_pb2 as pb
from switchboard.v1 import inference_pb2_grpc

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
DEFAULTS = SamplingParams()


_invalid = invalid


@dataclass(slots=True)
class CallRecord:
    """What one call's metrics record: its final status and what the engine reported."""

    adapter_label: str  # never a caller-chosen string: an adapter name only once it resolved
    shared: bool = False  # the adapter is shared (its name may appear in other tenants' metrics)
    status: str | None = None  # gRPC status name, once decided
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float | None = None
    ttft_s: float | None = None
    reached_engine: bool = False  # an event came back: tokens were consumed
    quota_charged: bool = False  # the prompt was charged to the tenant's token bucket

    def saw(self, event: TokenEvent) -> None:
        self.reached_engine = True
        self.queue_s = self.queue_s if self.queue_s is not None else event.queue_s
        self.ttft_s = self.ttft_s if self.ttft_s is not None else event.ttft_s
        self.prompt_tokens, self.completion_tokens = event.prompt_tokens, event.completion_tokens


@dataclass(frozen=True, slots=True)
class Prepared:
    request: GenerationRequest  # what the engine gets (request_id is tenant-scoped)
    request_id: str  # what the caller sees
    adapter_name: str  # "tenant/name" or "" for the base model
    adapter_shared: bool = False
    parts: tuple[PartRef, ...] = ()  # a composition's parts (server/compose_api.py)


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, engine, registry, limiter: ConcurrencyLimiter, metrics: ServerMetrics,
                 poll_s: float = 0.25, quotas: Quotas | None = None, usage=None) -> None:
        self.quotas = quotas
        self.usage = usage  # server.usage.UsageRecorder or None
        self.engine = engine
        self.registry = registry  # server.adapters.registry.AdapterRegistry, or None (base model only)
        self.limiter = limiter
        self.metrics = metrics
        self.poll_s = poll_s  # how often a waiting worker re-checks that its call is alive
        self.prompts = PromptTokenizer(engine.tokenizer, engine.max_model_len)

    # ---- RPCs ----------------------------------------------------------------------------------
    def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        text, token_ids, logprobs, last, first = [], [], [], None, None
        prepared = None
        for prepared, event in self._serve(request, context):  # noqa: B007 - used after the loop
            first = first or event
            text.append(event.text)
            token_ids += event.token_ids
            logprobs += msg.logprobs(event)
            last = event
        if last is None:  # _serve aborted the call
            return pb.GenerateResponse()
        return pb.GenerateResponse(
            request_id=prepared.request_id, text="".join(text), token_ids=token_ids,
            finish_reason=str(last.finish_reason), usage=msg.usage(last),
            adapter=msg.adapter(prepared.adapter_name, last),
            timings=msg.timings(prepared.request.arrival_time, first, final=True), logprobs=logprobs,
            adapters=msg.parts(prepared.parts),
        )

    def GenerateStream(self, request: pb.GenerateRequest, context) -> Iterator[pb.GenerateChunk]:
        first = True
        for prepared, event in self._serve(request, context):
            chunk = pb.GenerateChunk(request_id=prepared.request_id, text=event.text, token_ids=event.token_ids,
                                     logprobs=msg.logprobs(event))
            if first:
                chunk.timings.CopyFrom(msg.timings(prepared.request.arrival_time, event, final=event.finished))
                first_event, first = event, False
            if event.finished:
                chunk.finished = True
                chunk.finish_reason = str(event.finish_reason)
                chunk.usage.CopyFrom(msg.usage(event))
                chunk.adapter.CopyFrom(msg.adapter(prepared.adapter_name, event))
                chunk.adapters.extend(msg.parts(prepared.parts))
                chunk.timings.CopyFrom(msg.timings(prepared.request.arrival_time, first_event, final=True))
            yield chunk

    # ---- one call's life -----------------------------------------------------------------------
    def _serve(self, request: pb.GenerateRequest, context) -> Iterator[tuple[Prepared, TokenEvent]]:
        """Yields (prepared, event) until the finishing event; aborts the call with a status on failure."""
        tenant = caller(context)
        started = time.monotonic()
        record = CallRecord(adapter_label=UNRESOLVED_LABEL if request.adapter or request.adapters else "")
        try:
            prepared = self._prepare(request, tenant, started)
            record.adapter_label, record.shared = prepared.adapter_name, prepared.adapter_shared
            with self.limiter.hold(tenant):
                if self.quotas is not None:
                    self.quotas.admit(tenant.name, tenant.limits, len(prepared.request.prompt_token_ids))
                    record.quota_charged = True
                self.metrics.in_flight.labels(tenant.name).inc()
                try:
                    for event in self._run(prepared, context, record):
                        yield prepared, event
                finally:
                    self.metrics.in_flight.labels(tenant.name).dec()
            record.status = record.status or grpc.StatusCode.OK.name
        except Exception as exc:
            code = status_of(exc)
            if code is None:
                raise
            record.status = code.name
            if isinstance(exc, QuotaExceeded):
                self.metrics.observe_throttled(tenant.name, exc.limit)
                if exc.retry_after_header is not None:
                    context.set_trailing_metadata((("retry-after", exc.retry_after_header),))
            context.abort(code, message_of(exc))
        finally:  # also when gRPC stops iterating a stream whose call ended (cancelled, deadline)
            record.status = record.status or _gone_status(context)
            self._account(tenant, record)
            self.metrics.observe_request(
                tenant.name, record.adapter_label, record.status, prompt_tokens=record.prompt_tokens,
                completion_tokens=record.completion_tokens, queue_s=record.queue_s, ttft_s=record.ttft_s,
                total_s=time.monotonic() - started, shared=record.shared,
            )

    def _run(self, prepared: Prepared, context, record: CallRecord) -> Iterator[TokenEvent]:
        """The engine's events for one call (submit errors propagate to the status table)."""
        engine_id = prepared.request.request_id
        handle = self.engine.submit(prepared.request)
        finished = False
        # the callback runs when the call ends for any reason (a no-op for a finished sequence);
        # add_callback is False when the call already ended (e.g. a deadline that expired meanwhile)
        if not context.add_callback(lambda: None if finished else self.engine.abort(engine_id)):
            self.engine.abort(engine_id)
        try:
            while True:
                try:
                    event = handle.get(timeout=self.poll_s)
                except queue.Empty:
                    if not context.is_active():
                        record.status = _gone_status(context)
                        return
                    if not self.engine.alive:  # never wait forever on a step loop that is gone
                        raise RequestError(grpc.StatusCode.UNAVAILABLE, "the engine is not running") from None
                    continue
                event = _coalesce(event, handle)
                record.saw(event)
                if event.finished:
                    finished = True
                    if event.finish_reason is FinishReason.ABORT:
                        if not context.is_active():
                            record.status = _gone_status(context)
                            return
                        raise RequestError(grpc.StatusCode.UNAVAILABLE,
                                           "the request was aborted: the server is shutting down")
                    if event.finish_reason is FinishReason.ERROR:
                        raise RequestError(grpc.StatusCode.INTERNAL, event.error or "the engine failed this request")
                if not context.is_active():
                    record.status = _gone_status(context)
                    return
                yield event
                if event.finished:
                    return
        finally:
            if not finished:
                self.engine.abort(engine_id)

    # ---- validation and tokenization ------------------------------------------------------------
    def _prepare(self, req: pb.GenerateRequest, tenant: Tenant, started: float) -> Prepared:
        given = [f for f, present in (("prompt", bool(req.prompt)), ("messages", len(req.messages) > 0),
                                      ("token_ids", len(req.token_ids) > 0)) if present]
        if not given:
            raise _invalid("the prompt is empty: set exactly one of prompt, messages, token_ids")
        if len(given) > 1:
            raise _invalid(f"set exactly one of prompt, messages, token_ids (got {' and '.join(given)})")
        if req.request_id and not _REQUEST_ID.match(req.request_id):
            raise _invalid(f"request_id must be 1-{MAX_REQUEST_ID_CHARS} printable ASCII characters without spaces")
        sampling = self._sampling(req)
        adapter_key, adapter_name, shared = self._resolve_adapter(tenant, req.adapter)
        composed = self._resolve_parts(tenant, req) if req.adapters else None
        if composed is not None:
            adapter_key, adapter_name, shared = composed.adapter, composed.label, composed.shared
        ids = self._tokens(req, given[0])
        request_id = req.request_id or uuid.uuid4().hex
        gen = GenerationRequest(
            request_id=f"{tenant.name}/{request_id}", prompt_token_ids=tuple(ids), sampling=sampling,
            adapter=adapter_key, tenant=tenant.name, arrival_time=started,
            parts=composed.parts if composed is not None else (),
        )
        return Prepared(gen, request_id, adapter_name, shared, composed.refs if composed is not None else ())

    def _sampling(self, req: pb.GenerateRequest) -> SamplingParams:
        stop = []
        for i, raw in enumerate(req.stop):
            try:
                stop.append(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise _invalid(f"stop[{i}] is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
        sampling = SamplingParams(
            max_new_tokens=req.max_new_tokens if req.HasField("max_new_tokens") else DEFAULTS.max_new_tokens,
            temperature=req.temperature if req.HasField("temperature") else DEFAULTS.temperature,
            top_p=req.top_p if req.HasField("top_p") else DEFAULTS.top_p,
            top_k=req.top_k if req.HasField("top_k") else DEFAULTS.top_k,
            seed=req.seed if req.HasField("seed") else None,
            stop=tuple(stop), ignore_eos=req.ignore_eos,
            min_p=req.min_p if req.HasField("min_p") else DEFAULTS.min_p,
            presence_penalty=req.presence_penalty if req.HasField("presence_penalty") else DEFAULTS.presence_penalty,
            frequency_penalty=(req.frequency_penalty if req.HasField("frequency_penalty")
                               else DEFAULTS.frequency_penalty),
            repetition_penalty=(req.repetition_penalty if req.HasField("repetition_penalty")
                                else DEFAULTS.repetition_penalty),
            logit_bias=tuple(sorted(req.logit_bias.items())),
            min_tokens=req.min_tokens if req.HasField("min_tokens") else DEFAULTS.min_tokens,
            logprobs=req.logprobs,
            top_logprobs=req.top_logprobs if req.HasField("top_logprobs") else DEFAULTS.top_logprobs,
        )
        sampling.validate(self.engine.config.max_new_tokens_limit, self.engine.args.vocab_size)  # -> INVALID_ARGUMENT
        return sampling

    def _resolve_adapter(self, tenant: Tenant, name: str) -> tuple[str | None, str, bool]:
        if not name:
            return None, "", False
        if self.registry is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"adapter {clip(name)} not found (no adapter store)")
        resolved = self.registry.resolve(tenant, name)  # AdapterNotFound / AdapterForbidden: the status table
        return resolved.pool_key, f"{resolved.tenant}/{resolved.name}", resolved.shared

    def _resolve_parts(self, tenant: Tenant, req: pb.GenerateRequest) -> ResolvedParts:
        """The `adapters` composition, each part resolved like `adapter` (server/compose_api.py)."""
        if req.adapter:
            raise _invalid("set `adapter` or `adapters`, not both (a single adapter may be one entry of `adapters`)")
        if self.registry is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, "adapters not found (no adapter store)")
        specs = [PartSpec(a.name, a.weight if a.HasField("weight") else 1.0) for a in req.adapters]
        return resolve_parts(self.registry, tenant, specs, self.engine.config.max_adapters_per_request)

    def _tokens(self, req: pb.GenerateRequest, source: str) -> list[int]:
        if source == "token_ids":
            return list(req.token_ids)  # the engine checks the vocabulary range and the context limit
        if source == "prompt":
            return self.prompts.encode(req.prompt)
        self.prompts.check_message_count(len(req.messages))
        messages = []
        for i, m in enumerate(req.messages):
            if m.role not in CHAT_ROLES:
                raise _invalid(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {clip(m.role)}")
            messages.append({"role": m.role, "content": m.content})
        if not messages[-1]["content"] and len(messages) == 1:
            raise _invalid("the prompt is empty: messages[0].content is empty")
        return self.prompts.chat(messages, "send `prompt` or `token_ids` instead of `messages`")

    @property
    def _tokenizer_lock(self):
        return self.prompts.lock

    def _account(self, tenant: Tenant, record: CallRecord) -> None:
        """What a request that reached the engine consumed: completion tokens against its tokens-per-minute
        bucket, and a usage record (the same counts as the response's `usage`)."""
        if not record.reached_engine:
            return
        if record.quota_charged and self.quotas is not None:
            self.quotas.charge_completion(tenant.name, tenant.limits, record.completion_tokens)
        if self.usage is not None:
            adapter = record.adapter_label if record.adapter_label != UNRESOLVED_LABEL else ""
            self.usage.record(tenant.name, adapter, record.prompt_tokens, record.completion_tokens)


def _coalesce(event: TokenEvent, handle) -> TokenEvent:
    """`event` merged with the events already queued behind it: a caller that fell behind the engine
    gets one chunk per wake-up instead of one per token (less per-message overhead, same text)."""
    merged = [event]
    while not merged[-1].finished:
        try:
            merged.append(handle.get(timeout=0))
        except queue.Empty:
            break
    return merge_events(merged)


DEADLINE_SLACK_S = 0.05  # a client cancels at its own deadline, which can reach us just before ours


def _gone_status(context) -> str:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED.name
    return grpc.StatusCode.CANCELLED.name
