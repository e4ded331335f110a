"""The Inference servicer: proto <-> engine objects, validation, tokenization, status codes. No torch here.

A request's way through: authenticated tenant (server.auth) -> `_prepare` (exactly one of prompt /
messages / token_ids, sampling values, stop strings, adapter resolved through the registry, chat
template) -> per-tenant concurrency slot -> quotas (server.quotas: requests and tokens per minute) ->
`Engine.submit` -> TokenEvents -> response or chunks -> usage record (server.usage). Slot, quota, submit,
abort and the bill are server.lifecycle's `Call`, the object the HTTP face uses too: a cancelled call or an
expired deadline aborts the engine sequence (its KV is freed at the next step) and is billed what it computed.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from server import grpc_messages as msg
from server.auth import caller
from server.clip import clip
from server.compose_api import PartRef, PartSpec, ResolvedParts, resolve_parts
from server.engine.request import GenerationRequest, SamplingParams, TokenEvent
from server.lifecycle import ENGINE_CHECK_S, Call, check_prompt, check_sampling, failure, wait_events
from server.metrics import UNRESOLVED_LABEL, ServerMetrics
from server.prompting import PromptTokenizer
from server.quotas import QuotaExceeded, Quotas
from server.status import RequestError, invalid, message_of, status_of
from server.structured.proto_fields import constraint_of
from server.tenants import ConcurrencyLimiter, Tenant
from switchboard.v1 import inference_pb2 as pb
from switchboard.v1 import inference_pb2_grpc

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
DEFAULTS = SamplingParams()




@dataclass(frozen=True, slots=True)
class Prepared:
    request: GenerationRequest  # what the engine gets (request_id is tenant-scoped)
    request_id: str  # what the caller sees
    adapter_name: str  # "tenant/name" or "" for the base model
    adapter_shared: bool = False
    parts: tuple[PartRef, ...] = ()  # a composition's parts (server/compose_api.py)


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, engine, registry, limiter: ConcurrencyLimiter, metrics: ServerMetrics,
                 engine_check_s: float = ENGINE_CHECK_S, quotas: Quotas | None = None, usage=None) -> None:
        self.quotas = quotas
        self.usage = usage  # server.usage.UsageRecorder or None
        self.engine = engine
        self.registry = registry  # server.adapters.registry.AdapterRegistry, or None (base model only)
        self.limiter = limiter
        self.metrics = metrics
        self.engine_check_s = engine_check_s  # how often a waiting worker checks that the step loop is alive
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

    # ---- one call's life (server.lifecycle: the same object the HTTP face uses) --------------------
    def _serve(self, request: pb.GenerateRequest, context) -> Iterator[tuple[Prepared, TokenEvent]]:
        """Yields (prepared, event) until the finishing event; aborts the call with a status on failure."""
        tenant = caller(context)
        call = Call(self, tenant, UNRESOLVED_LABEL if request.adapter or request.adapters else "")
        try:
            prepared = self._prepare(request, tenant, call.started)
            call.adapter_label, call.shared = prepared.adapter_name, prepared.adapter_shared
            call.hold_slot()
            yield from ((prepared, event) for event in self._run(prepared, context, call))
            call.status = call.status or grpc.StatusCode.OK.name
        except Exception as exc:
            code = status_of(exc)
            if code is None:
                raise
            call.status = code.name
            if isinstance(exc, QuotaExceeded) and exc.retry_after_header is not None:
                context.set_trailing_metadata((("retry-after", exc.retry_after_header),))
            context.abort(code, message_of(exc))
        finally:  # also when gRPC stops iterating a stream whose call ended (cancelled, deadline)
            call.close(_gone_status(context))

    def _run(self, prepared: Prepared, context, call: Call) -> Iterator[TokenEvent]:
        """The engine's events for one call, woken by the engine (or by the call ending) rather than polling."""
        wake = threading.Event()
        (handle,) = call.submit([prepared.request])

        def ended() -> None:  # the call ended for any reason: abort (a no-op once finished) and wake the reader
            call.close(_gone_status(context))
            wake.set()

        if not context.add_callback(ended):  # the call already ended (e.g. a deadline that expired meanwhile)
            ended()
        for item in wait_events([handle], wake, self.engine_check_s):
            if item is not None:
                call.saw(0, item[1])  # before anything else: the bill counts what the engine computed
            if not context.is_active():
                call.status = call.status or _gone_status(context)
                return
            if item is None:
                if not self.engine.alive:  # never wait forever on a step loop that is gone
                    raise RequestError(grpc.StatusCode.UNAVAILABLE, "the engine is not running")
                continue
            event = item[1]
            error = failure(event)
            if error is not None:
                raise error
            yield event

    # ---- validation and tokenization ------------------------------------------------------------
    def _prepare(self, req: pb.GenerateRequest, tenant: Tenant, started: float) -> Prepared:
        given = [f for f, present in (("prompt", bool(req.prompt)), ("messages", len(req.messages) > 0),
                                      ("token_ids", len(req.token_ids) > 0)) if present]
        if not given:
            raise invalid("the prompt is empty: set exactly one of prompt, messages, token_ids")
        if len(given) > 1:
            raise invalid(f"set exactly one of prompt, messages, token_ids (got {' and '.join(given)})")
        if req.request_id and not _REQUEST_ID.match(req.request_id):
            raise invalid(f"request_id must be 1-{MAX_REQUEST_ID_CHARS} printable ASCII characters without spaces")
        sampling = self._sampling(req)
        adapter_key, adapter_name, shared = self._resolve_adapter(tenant, req.adapter)
        composed = self._resolve_parts(tenant, req) if req.adapters else None
        if composed is not None:
            adapter_key, adapter_name, shared = composed.adapter, composed.label, composed.shared
        ids = self._tokens(req, given[0])
        check_prompt(ids, self.engine)  # the vocabulary range and the context limit, as the HTTP face checks them
        request_id = req.request_id or uuid.uuid4().hex
        constraint = constraint_of(req)
        if constraint is not None:  # compiled (or found cached) on this call's worker thread: invalid -> here
            self.engine.grammars.compile(constraint)
        gen = GenerationRequest(
            request_id=f"{tenant.name}/{request_id}", prompt_token_ids=tuple(ids), sampling=sampling,
            adapter=adapter_key, tenant=tenant.name, arrival_time=started, constraint=constraint,
            cache_salt=req.cache_salt if req.HasField("cache_salt") else None,
            parts=composed.parts if composed is not None else (),
        )
        return Prepared(gen, request_id, adapter_name, shared, composed.refs if composed is not None else ())

    def _sampling(self, req: pb.GenerateRequest) -> SamplingParams:
        stop = []
        for i, raw in enumerate(req.stop):
            try:
                stop.append(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise invalid(f"stop[{i}] is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
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
        check_sampling(sampling, self.engine)  # InvalidRequest -> INVALID_ARGUMENT
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
            raise invalid("set `adapter` or `adapters`, not both (a single adapter may be one entry of `adapters`)")
        if self.registry is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, "adapters not found (no adapter store)")
        specs = [PartSpec(a.name, a.weight if a.HasField("weight") else 1.0) for a in req.adapters]
        return resolve_parts(self.registry, tenant, specs, self.engine.config.max_adapters_per_request)

    def _tokens(self, req: pb.GenerateRequest, source: str) -> list[int]:
        if source == "token_ids":
            return list(req.token_ids)
        if source == "prompt":
            return self.prompts.encode(req.prompt)
        self.prompts.check_message_count(len(req.messages))
        messages = []
        for i, m in enumerate(req.messages):
            if m.role not in CHAT_ROLES:
                raise invalid(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {clip(m.role)}")
            messages.append({"role": m.role, "content": m.content})
        if not messages[-1]["content"] and len(messages) == 1:
            raise invalid("the prompt is empty: messages[0].content is empty")
        return self.prompts.chat(messages, "send `prompt` or `token_ids` instead of `messages`")

    @property
    def _tokenizer_lock(self):
        return self.prompts.lock


DEADLINE_SLACK_S = 0.05  # a client cancels at its own deadline, which can reach us just before ours


def _gone_status(context) -> str:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED.name
    return grpc.StatusCode.CANCELLED.name
