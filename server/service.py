"""The Inference servicer: proto <-> engine objects, validation, tokenization, status codes. No torch here.

A request's way through: authenticated tenant (server.auth) -> `_prepare` (exactly one of prompt /
messages / token_ids, sampling values, stop strings, adapter resolved through the registry, chat
template) -> per-tenant concurrency slot -> quotas (server.quotas: requests and tokens per minute) ->
`Engine.submit` -> TokenEvents -> response or chunks -> usage record (server.usage).
A cancelled call or an expired deadline aborts the engine sequence (its KV is freed at the next step).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from server.adapters.errors import AdapterForbidden, AdapterNotFound
from server.auth import caller
from server.engine.request import (
    EngineStopped,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    QueueFull,
    SamplingParams,
    TokenEvent,
)
from server.metrics import UNRESOLVED_LABEL, ServerMetrics
from server.quotas import QuotaExceeded, Quotas
from server.tenants import ConcurrencyLimiter, Tenant, TenantBusy
from switchboard.v1 import inference_pb2 as pb
from switchboard.v1 import inference_pb2_grpc

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
CHARS_PER_TOKEN_BOUND = 32  # a prompt longer than this many chars per context token is refused untokenized
DEFAULTS = SamplingParams()


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True, slots=True)
class Prepared:
    request: GenerationRequest  # what the engine gets (request_id is tenant-scoped)
    request_id: str  # what the caller sees
    adapter_name: str  # "tenant/name" or "" for the base model


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
        self._tokenizer_lock = threading.Lock()

    # ---- RPCs ----------------------------------------------------------------------------------
    def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        text, token_ids, last, first = [], [], None, None
        prepared = None
        for prepared, event in self._serve(request, context):  # noqa: B007 - used after the loop
            first = first or event
            text.append(event.text)
            token_ids += event.token_ids
            last = event
        if last is None:  # _serve aborted the call
            return pb.GenerateResponse()
        return pb.GenerateResponse(
            request_id=prepared.request_id, text="".join(text), token_ids=token_ids,
            finish_reason=str(last.finish_reason), usage=_usage(last), adapter=_adapter(prepared, last),
            timings=_timings(prepared, first, final=True),
        )

    def GenerateStream(self, request: pb.GenerateRequest, context) -> Iterator[pb.GenerateChunk]:
        first = True
        for prepared, event in self._serve(request, context):
            chunk = pb.GenerateChunk(request_id=prepared.request_id, text=event.text, token_ids=event.token_ids)
            if first:
                chunk.timings.CopyFrom(_timings(prepared, event, final=event.finished))
                first_event, first = event, False
            if event.finished:
                chunk.finished = True
                chunk.finish_reason = str(event.finish_reason)
                chunk.usage.CopyFrom(_usage(event))
                chunk.adapter.CopyFrom(_adapter(prepared, event))
                chunk.timings.CopyFrom(_timings(prepared, first_event, final=True))
            yield chunk

    # ---- one call's life -----------------------------------------------------------------------
    def _serve(self, request: pb.GenerateRequest, context) -> Iterator[tuple[Prepared, TokenEvent]]:
        """Yields (prepared, event) until the finishing event; aborts the call with a status on failure."""
        tenant = caller(context)
        started = time.monotonic()
        # never a caller-chosen label: an adapter name only once it resolved
        adapter_label, status = UNRESOLVED_LABEL if request.adapter else "", None
        stats: dict = {}
        try:
            prepared = self._prepare(request, tenant, started)
            adapter_label = prepared.adapter_name
            with self.limiter.slot(tenant):
                if self.quotas is not None:
                    self.quotas.admit(tenant.name, tenant.limits, len(prepared.request.prompt_token_ids))
                    stats["quota"] = True
                self.metrics.in_flight.labels(tenant.name).inc()
                try:
                    for event in self._run(prepared, context, stats):
                        yield prepared, event
                finally:
                    self.metrics.in_flight.labels(tenant.name).dec()
            status = stats.get("status", "OK")
        except RequestError as exc:
            status = exc.code.name
            context.abort(exc.code, exc.message)
        except TenantBusy as exc:
            status = grpc.StatusCode.RESOURCE_EXHAUSTED.name
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except QuotaExceeded as exc:
            status = grpc.StatusCode.RESOURCE_EXHAUSTED.name
            self.metrics.observe_throttled(tenant.name, exc.limit)
            if exc.retry_after_header is not None:
                context.set_trailing_metadata((("retry-after", exc.retry_after_header),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        finally:  # also when gRPC stops iterating a stream whose call ended (cancelled, deadline)
            status = stats.get("status") or status or _gone_status(context)
            self._account(tenant, adapter_label, stats)
            self.metrics.observe_request(
                tenant.name, adapter_label, status, prompt_tokens=stats.get("prompt_tokens", 0),
                completion_tokens=stats.get("completion_tokens", 0), queue_s=stats.get("queue_s"),
                ttft_s=stats.get("ttft_s"), total_s=time.monotonic() - started,
            )

    def _run(self, prepared: Prepared, context, stats: dict) -> Iterator[TokenEvent]:
        engine_id = prepared.request.request_id
        try:
            handle = self.engine.submit(prepared.request)
        except AdapterNotFound as exc:  # the adapter was deleted between resolve() and submit()
            raise RequestError(grpc.StatusCode.NOT_FOUND, _message(exc)) from None
        except InvalidRequest as exc:
            raise _invalid(str(exc)) from None
        except QueueFull as exc:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except EngineStopped as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
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
                        stats["status"] = _gone_status(context)
                        return
                    if not self.engine.alive:  # never wait forever on a step loop that is gone
                        raise RequestError(grpc.StatusCode.UNAVAILABLE, "the engine is not running") from None
                    continue
                event = _coalesce(event, handle)
                if "queue_s" not in stats and event.queue_s is not None:
                    stats["queue_s"] = event.queue_s
                if "ttft_s" not in stats and event.ttft_s is not None:
                    stats["ttft_s"] = event.ttft_s
                stats["prompt_tokens"], stats["completion_tokens"] = event.prompt_tokens, event.completion_tokens
                if event.finished:
                    finished = True
                    if event.finish_reason is FinishReason.ABORT:
                        if not context.is_active():
                            stats["status"] = _gone_status(context)
                            return
                        raise RequestError(grpc.StatusCode.UNAVAILABLE,
                                           "the request was aborted: the server is shutting down")
                    if event.finish_reason is FinishReason.ERROR:
                        raise RequestError(grpc.StatusCode.INTERNAL, event.error or "the engine failed this request")
                if not context.is_active():
                    stats["status"] = _gone_status(context)
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
        adapter_key, adapter_name = self._resolve_adapter(tenant, req.adapter)
        ids = self._tokens(req, given[0])
        request_id = req.request_id or uuid.uuid4().hex
        gen = GenerationRequest(
            request_id=f"{tenant.name}/{request_id}", prompt_token_ids=tuple(ids), sampling=sampling,
            adapter=adapter_key, tenant=tenant.name, arrival_time=started,
        )
        return Prepared(gen, request_id, adapter_name)

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
        )
        try:
            sampling.validate(self.engine.config.max_new_tokens_limit)
        except InvalidRequest as exc:
            raise _invalid(str(exc)) from None
        return sampling

    def _resolve_adapter(self, tenant: Tenant, name: str) -> tuple[str | None, str]:
        if not name:
            return None, ""
        if self.registry is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"adapter {name!r} not found (no adapter store)")
        try:
            resolved = self.registry.resolve(tenant, name)
        except AdapterNotFound as exc:
            raise RequestError(grpc.StatusCode.NOT_FOUND, _message(exc)) from None
        except AdapterForbidden as exc:
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED, _message(exc)) from None
        return resolved.pool_key, f"{resolved.tenant}/{resolved.name}"

    def _tokens(self, req: pb.GenerateRequest, source: str) -> list[int]:
        if source == "token_ids":
            return list(req.token_ids)  # the engine checks the vocabulary range and the context limit
        limit = self.engine.max_model_len * CHARS_PER_TOKEN_BOUND
        if source == "prompt":
            if len(req.prompt) > limit:
                raise _invalid(f"the prompt has {len(req.prompt)} characters; the limit is {limit} "
                               f"(context limit {self.engine.max_model_len} tokens)")
            with self._tokenizer_lock:
                return list(self.engine.tokenizer.encode(req.prompt))
        messages = []
        for i, m in enumerate(req.messages):
            if m.role not in CHAT_ROLES:
                raise _invalid(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}")
            messages.append({"role": m.role, "content": m.content})
        if sum(len(m["content"]) for m in messages) > limit:
            raise _invalid(f"the messages have more than {limit} characters (context limit "
                           f"{self.engine.max_model_len} tokens)")
        if not messages[-1]["content"] and len(messages) == 1:
            raise _invalid("the prompt is empty: messages[0].content is empty")
        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise _invalid("this model has no chat template; send `prompt` or `token_ids` instead of `messages`")
        with self._tokenizer_lock:
            try:
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except Exception as exc:  # the template itself may refuse (e.g. roles out of order)
                raise _invalid(f"the chat template refused the messages: {exc}") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _account(self, tenant: Tenant, adapter: str, stats: dict) -> None:
        """What a request that reached the engine consumed: completion tokens against its tokens-per-minute
        bucket, and a usage record (the same counts as the response's `usage`)."""
        if "prompt_tokens" not in stats:
            return
        if stats.get("quota") and self.quotas is not None:
            self.quotas.charge_completion(tenant.name, tenant.limits, stats.get("completion_tokens", 0))
        if self.usage is not None:
            self.usage.record(tenant.name, adapter if adapter != UNRESOLVED_LABEL else "",
                              stats["prompt_tokens"], stats.get("completion_tokens", 0))


def _coalesce(event: TokenEvent, handle) -> TokenEvent:
    """`event` merged with the events already queued behind it: a caller that fell behind the engine
    gets one chunk per wake-up instead of one per token (less per-message overhead, same text)."""
    merged = [event]
    while not merged[-1].finished:
        try:
            merged.append(handle.get(timeout=0))
        except queue.Empty:
            break
    if len(merged) == 1:
        return event
    last = merged[-1]
    return dataclasses.replace(
        last, token_ids=tuple(t for e in merged for t in e.token_ids), text="".join(e.text for e in merged),
        queue_s=event.queue_s if event.queue_s is not None else last.queue_s,
        ttft_s=event.ttft_s if event.ttft_s is not None else last.ttft_s,
    )


def _message(exc: Exception) -> str:
    return str(exc.args[0]) if exc.args else str(exc)


DEADLINE_SLACK_S = 0.05  # a client cancels at its own deadline, which can reach us just before ours


def _gone_status(context) -> str:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED.name
    return grpc.StatusCode.CANCELLED.name


def _usage(event: TokenEvent) -> pb.Usage:
    return pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens)


def _adapter(prepared: Prepared, event: TokenEvent) -> pb.AdapterRef:
    return pb.AdapterRef(name=prepared.adapter_name, version=event.adapter_version or 0)


def _timings(prepared: Prepared, first: TokenEvent | None, final: bool) -> pb.Timings:
    t = pb.Timings()
    if first is not None and first.queue_s is not None:
        t.queue_ms = first.queue_s * 1e3
    if first is not None and first.ttft_s is not None:
        t.ttft_ms = first.ttft_s * 1e3
    if final:
        t.total_ms = (time.monotonic() - prepared.request.arrival_time) * 1e3
    return t
