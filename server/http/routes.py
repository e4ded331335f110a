"""The endpoints: /v1/chat/completions, /v1/completions, /v1/models, /health.

A generation's way: Bearer key -> tenant (server.tenants, as gRPC) -> body parsed and validated (schemas)
-> `model` (or the extra `adapter` field) resolved through the adapter registry -> tokens (chat template
for chat) -> tenant slot -> len(prompts) * n engine sequences submitted together (choice i of a seeded
request uses seed + i) -> events (bridge) -> one JSON response, or SSE chunks as OpenAI streams them.
"""

from __future__ import annotations

import json
import time
import uuid

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from server.adapters.errors import AdapterForbidden, AdapterNotFound
from server.engine.request import GenerationRequest, InvalidRequest
from server.http import schemas
from server.http.bridge import events
from server.http.calls import EventStream
from server.http.compose import resolve_http_parts
from server.http.errors import CLIENT_GONE, NOT_FOUND, TOO_LARGE, UNAVAILABLE, ApiError, from_exception, invalid
from server.http.responses import Choice, Envelope, TokenText, chat_logprobs, completion_logprobs, sse, usage
from server.http.structured import OutputSpec, compile_output, output_spec, render_chat
from server.http.tools import ToolStream, chat_message, stream_tail
from server.lifecycle import Call, ContextTooLong, check_prompt, failure
from server.metrics import UNRESOLVED_LABEL
from server.prompting import PromptTokenizer
from server.tenants import Unauthenticated

MAX_BODY_BYTES = 8 << 20
BASE_ALIASES = ("base", "")
DISCONNECT_CHECK_S = 0.5


class OpenAIApi:
    def __init__(self, engine, registry, tenants, limiter, metrics, model_id: str, quotas=None, usage=None) -> None:
        self.engine, self.registry, self.tenants = engine, registry, tenants
        self.limiter, self.metrics, self.model_id = limiter, metrics, model_id
        self.quotas = quotas  # server.quotas.Quotas shared with gRPC, or None
        self.usage = usage  # server.usage.UsageRecorder shared with gRPC, or None
        self.token_text = TokenText(engine.tokenizer)
        self.prompts = PromptTokenizer(engine.tokenizer, engine.max_model_len)  # shared bounds and lock with gRPC
        self.draining = False
        self.active_calls = 0
        self.max_body_bytes = MAX_BODY_BYTES

    # ---- endpoints ------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        ok = self.engine.alive and not self.draining
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    async def models(self, request: Request) -> Response:
        try:
            tenant = self._auth(request)
        except ApiError as exc:
            return exc.response()
        data = [{"id": self.model_id, "object": "model", "created": 0, "owned_by": "switchboard", "kind": "base",
                 "root": self.model_id, "parent": None}]
        for info in self.registry.list(tenant) if self.registry is not None else ():
            full = f"{info.tenant}/{info.name}"
            ids = [full]
            try:
                if self.registry.resolve(tenant, info.name).tenant == info.tenant:
                    ids.insert(0, info.name)  # the short name means this adapter for this caller
            except (AdapterNotFound, AdapterForbidden):
                pass
            data += [{"id": i, "object": "model", "created": int(info.created_at), "owned_by": info.tenant,
                      "root": full, "parent": self.model_id, "kind": info.kind, "version": info.version,
                      "shared": info.shared} for i in ids]
        return JSONResponse({"object": "list", "data": data})

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    # ---- one generation -------------------------------------------------------------------------
    async def _generate(self, request: Request, chat: bool) -> Response:
        call = None
        try:
            if self.draining:
                raise ApiError(UNAVAILABLE, "the server is shutting down; retry on another replica")
            tenant = self._auth(request)
            call = self._open(tenant)
            body = await self._json(request)
            parsed = schemas.parse(body, chat=chat, vocab_size=self.engine.args.vocab_size,
                                   max_new_tokens_limit=self.engine.config.max_new_tokens_limit)
            output = output_spec(body, chat)  # response_format, guided_*, tools (server/http/structured.py)
            parts = ()
            if parsed.adapters:  # a composition (server/http/compose.py)
                composed = resolve_http_parts(self.registry, tenant, parsed, self.model_id,
                                              self.engine.config.max_adapters_per_request)
                adapter_key, call.adapter_label, parts = composed.adapter, composed.label, composed.parts
            else:
                adapter_key, call.adapter_label = self._resolve(tenant, parsed)
            prompts = self._tokenize(parsed, output)
            compiled = await compile_output(self.engine, output)  # a worker thread, before any slot is taken
            call.hold_slot()
            call.submit(self._requests(tenant, parsed, prompts, adapter_key, compiled, parts),
                        [i // parsed.n for i in range(len(prompts) * parsed.n)])  # n choices share a prompt
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error object
            error = from_exception(exc, "messages" if chat else "prompt")
            if call is not None:
                call.close(error.kind.grpc_status)
            return error.response()
        envelope = Envelope(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, parsed.model, chat)
        if parsed.stream:
            return EventStream(self._stream(call, parsed, envelope, output), call)
        try:
            return await self._unary(request, call, parsed, envelope, prompts, output)
        except ApiError as exc:
            call.close(exc.kind.grpc_status)
            return exc.response()
        finally:
            call.close("CANCELLED")

    def _open(self, tenant) -> Call:
        """A lifecycle Call (server.lifecycle, shared with gRPC) counted in `active_calls` until it closes."""
        self.active_calls += 1

        def closed() -> None:
            self.active_calls -= 1

        return Call(self, tenant, UNRESOLVED_LABEL, on_close=closed)

    def _auth(self, request: Request):
        header = request.headers.get("authorization")
        try:
            return self.tenants.authenticate([("authorization", header)] if header is not None else [])
        except Unauthenticated as exc:
            self.metrics.observe_unauthenticated("http")
            message = str(exc).replace("metadata", "header")
            raise ApiError(from_exception(exc).kind, message) from None

    async def _json(self, request: Request) -> object:
        """The body as JSON, read chunk by chunk: a body over `max_body_bytes` (declared, or chunked and only
        found out while reading) is a 413 as soon as it passes the limit, never held whole in memory."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(TOO_LARGE, f"the request body has {declared} bytes; the limit is {limit}")
        raw = bytearray()
        try:
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > limit:
                    raise ApiError(TOO_LARGE, f"the request body is over the limit of {limit} bytes")
        except ClientDisconnect:  # the client left mid-body, or the port's body timeout closed it (it sent 408)
            raise ApiError(CLIENT_GONE, "the connection closed before the request body was complete") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise invalid(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None

    def _resolve(self, tenant, parsed: schemas.ParsedRequest) -> tuple[str | None, str]:
        name, param = (parsed.adapter, "adapter") if parsed.adapter is not None else (parsed.model, "model")
        if name == self.model_id or name in BASE_ALIASES:
            return None, ""
        if self.registry is None:
            raise ApiError(NOT_FOUND, f"The model '{name}' does not exist (this server has no adapter store)", param)
        try:
            resolved = self.registry.resolve(tenant, name)
        except (AdapterNotFound, AdapterForbidden) as exc:
            error = from_exception(exc)
            raise ApiError(error.kind, f"The model '{name}' is not available: {error.message}", param) from None
        return resolved.pool_key, f"{resolved.tenant}/{resolved.name}"

    def _tokenize(self, parsed: schemas.ParsedRequest, output: OutputSpec | None = None) -> list[list[int]]:
        if parsed.chat:
            try:
                tools = output.tools if output is not None else None
                prompts = [render_chat(self.prompts, parsed.messages, tools, "use /v1/completions")]
            except InvalidRequest as exc:
                raise invalid(str(exc), "messages") from None
        else:
            prompts = []
            for p in parsed.prompts:
                if isinstance(p, str):
                    try:
                        p = self.prompts.encode(p)
                    except InvalidRequest as exc:
                        raise invalid(str(exc), "prompt") from None
                prompts.append(p)
        param = "messages" if parsed.chat else "prompt"
        for ids in prompts:
            try:
                check_prompt(ids, self.engine)  # the vocabulary range and the context limit, as gRPC checks them
            except ContextTooLong as exc:
                raise invalid(str(exc), param, "context_length_exceeded") from None
            except InvalidRequest as exc:
                raise invalid(str(exc), param) from None
        return prompts

    def _requests(self, tenant, parsed: schemas.ParsedRequest, prompts: list[list[int]], adapter_key: str | None,
                  constraint=None, parts: tuple = ()) -> list[GenerationRequest]:
        base = uuid.uuid4().hex
        started = time.monotonic()
        out = []
        for p_index, ids in enumerate(prompts):
            sampling = schemas.finalize(parsed.sampling, len(ids), self.engine)  # lifecycle.check_sampling
            for i in range(parsed.n):
                seed = None if sampling.seed is None else (sampling.seed + i) % 2**63  # choice i: seed + i
                out.append(GenerationRequest(
                    request_id=f"{tenant.name}/http-{base}-{p_index * parsed.n + i}", prompt_token_ids=tuple(ids),
                    sampling=sampling if i == 0 else _with_seed(sampling, seed), adapter=adapter_key,
                    tenant=tenant.name, arrival_time=started, constraint=constraint,
                    cache_salt=parsed.cache_salt, parts=parts))
        return out

    async def _unary(self, request: Request, call: Call, parsed, envelope: Envelope, prompts,
                     output: OutputSpec | None = None) -> Response:
        choices = [Choice() for _ in call.handles]
        text_of = self.token_text.as_ids if parsed.tokens_as_ids else self.token_text
        checked = time.monotonic()
        async for item in events(call.handles):
            if item is None or time.monotonic() - checked > DISCONNECT_CHECK_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    call.close("CANCELLED")
                    return Response(status_code=499)
                if not self.engine.alive:
                    raise ApiError(UNAVAILABLE, "the engine is not running")
            if item is None:
                continue
            i, event = item
            call.saw(i, event)
            error = failure(event)
            if error is not None:
                raise from_exception(error)
            choices[i].add(event)
        call.close("OK")
        out = []
        for i, c in enumerate(choices):
            text = "".join(c.text)
            if parsed.chat:
                message, finish = chat_message(text, c.finish_reason, output.tools if output else None)
                body = {"index": i, "message": message,
                        "logprobs": chat_logprobs(c.token_ids, c.logprobs, c.top_logprobs, text_of)
                        if parsed.logprobs else None, "finish_reason": finish}
            else:
                prefix = self.engine.tokenizer.decode(prompts[i // parsed.n]) if parsed.echo else ""
                body = {"index": i, "text": prefix + text, "finish_reason": c.finish_reason,
                        "logprobs": completion_logprobs(c.token_ids, c.logprobs, c.top_logprobs, text_of,
                                                        len(prefix)) if parsed.logprobs else None}
            out.append(body)
        prompt_tokens = sum(len(p) for p in prompts)
        return JSONResponse(envelope.wrap(out, chunk=False, usage_=usage(prompt_tokens, call.completion_tokens,
                                                                         call.cached_prompt_tokens)))

    async def _stream(self, call: Call, parsed, envelope: Envelope, output: OutputSpec | None = None):
        with_usage = parsed.include_usage
        spec = output.tools if output is not None and parsed.chat else None
        tool_streams = [ToolStream(spec) for _ in call.handles] if spec is not None else None
        if parsed.chat:
            for i in range(len(call.handles)):
                yield sse(envelope.wrap([{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}], True, None, with_usage))
        offsets = [0] * len(call.handles)
        if parsed.echo:  # completions: the prompt's text first, as its own chunk per choice
            for i, req in enumerate(call.requests):
                prefix = self.engine.tokenizer.decode(list(req.prompt_token_ids))
                offsets[i] = len(prefix)
                yield sse(envelope.wrap([{"index": i, "text": prefix, "logprobs": None, "finish_reason": None}],
                                        True, None, with_usage))
        text_of = self.token_text.as_ids if parsed.tokens_as_ids else self.token_text
        async for item in events(call.handles):
            if item is None:
                if not self.engine.alive:
                    yield sse(ApiError(UNAVAILABLE, "the engine is not running").body())
                    call.close("UNAVAILABLE")
                    return
                continue
            i, event = item
            call.saw(i, event)
            error = failure(event)
            if error is not None:  # mid-stream: an error event, as vLLM sends it, then the stream ends
                exc = from_exception(error)
                yield sse(exc.body())
                call.close(exc.kind.grpc_status)
                return
            if not (event.text or event.finished or (parsed.logprobs and event.token_ids)):
                continue
            finish = str(event.finish_reason) if event.finished else None
            delta = {"content": event.text} if event.text else {}
            if tool_streams is not None:  # chat with tools: text that may be a call is held to the end
                text = tool_streams[i].feed(event.text)
                delta = {"content": text} if text else {}
                if event.finished:
                    tail, finish = stream_tail(tool_streams[i], finish)
                    content = text + tail.pop("content", "")
                    delta = {**({"content": content} if content else {}), **tail}
                elif not delta and not parsed.logprobs:
                    continue
            lp = None
            if parsed.logprobs:
                args = (list(event.token_ids), list(event.logprobs), list(event.top_logprobs), text_of)
                lp = chat_logprobs(*args) if parsed.chat else completion_logprobs(*args, offsets[i])
            offsets[i] += len(event.text)
            choice = ({"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish} if parsed.chat else
                      {"index": i, "text": event.text, "logprobs": lp, "finish_reason": finish})
            yield sse(envelope.wrap([choice], True, None, with_usage))
        if with_usage:
            prompt_tokens = sum(len(r.prompt_token_ids) for r in call.requests[:: parsed.n])
            yield sse(envelope.wrap([], True, usage(prompt_tokens, call.completion_tokens,
                                                    call.cached_prompt_tokens)))
        call.close("OK")
        yield sse("[DONE]")


def _with_seed(sampling, seed: int | None):
    import dataclasses

    return dataclasses.replace(sampling, seed=seed)
