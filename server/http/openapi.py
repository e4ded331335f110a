"""The OpenAPI 3.1 document of the HTTP API, served at GET /openapi.json: our fields, vLLM's extras, the error
shape, and the bounds `server/http/schemas.py` enforces (so a schema-driven fuzzer such as schemathesis knows
what is valid; a value outside them is a 400 naming the field, never a 5xx)."""

from __future__ import annotations

from server.engine.request import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS
from server.http import schemas

ERROR_STATUSES = {
    "400": "Invalid request: `param` names the field", "401": "Missing or unknown API key",
    "403": "Another tenant's private adapter", "404": "Unknown model or adapter",
    "408": "The body was not complete within the body timeout of its headers", "413": "Body over the limit",
    "429": "Tenant limit, quota or full queue (Retry-After)", "503": "Draining, or the port is at its connection "
    "limit and the request has no valid key (Retry-After)",
}


def _int(lo: int | None = None, hi: int | None = None) -> dict:
    out: dict = {"type": "integer"}
    if lo is not None:
        out["minimum"] = lo
    if hi is not None:
        out["maximum"] = hi
    return out


def _num(lo: float, hi: float, lo_open: bool = False) -> dict:
    return {"type": "number", **({"exclusiveMinimum": lo} if lo_open else {"minimum": lo}), "maximum": hi}


def _sampling(limit: int) -> dict:
    """Parameters both endpoints take (OpenAI's and vLLM's extras)."""
    string_stop = {"type": "string", "minLength": 1, "maxLength": 256}
    return {
        "model": {"type": "string", "minLength": 1, "description": "the base model's id, 'base', or an adapter"},
        "adapter": {"type": "string", "description": "the adapter, for clients that pin `model`"},
        "max_tokens": _int(1, limit), "temperature": _num(0.0, 2.0), "top_p": _num(0.0, 1.0, lo_open=True),
        "n": _int(1, schemas.MAX_N), "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "stop": {"oneOf": [string_stop, {"type": "array", "maxItems": schemas.MAX_STOP, "items": string_stop}]},
        "seed": _int(0, 2**63 - 1), "presence_penalty": _num(-2.0, 2.0), "frequency_penalty": _num(-2.0, 2.0),
        "logit_bias": {"type": "object", "maxProperties": MAX_LOGIT_BIAS,
                       "additionalProperties": _num(-100.0, 100.0), "propertyNames": {"pattern": "^[0-9]+$"}},
        "user": {"type": "string"}, "top_k": _int(-1), "min_p": _num(0.0, 1.0),
        "repetition_penalty": _num(0.0, 100.0, lo_open=True), "ignore_eos": {"type": "boolean"},
        "min_tokens": _int(0, limit), "return_tokens_as_token_ids": {"type": "boolean"},
    }


def document(model_id: str, max_new_tokens_limit: int) -> dict:
    limit = max_new_tokens_limit
    text_part = {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": list(schemas.CHAT_ROLES)},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": text_part}]}}}
    tokens = {"type": "array", "minItems": 1, "items": _int(0)}
    chat = {"type": "object", "required": ["model", "messages"], "properties": {
        **_sampling(limit), "messages": {"type": "array", "minItems": 1, "items": message},
        "max_completion_tokens": _int(1, limit), "logprobs": {"type": "boolean"},
        "top_logprobs": _int(0, MAX_TOP_LOGPROBS)}}
    completion = {"type": "object", "required": ["model", "prompt"], "properties": {
        **_sampling(limit), "echo": {"type": "boolean"}, "logprobs": _int(0, MAX_TOP_LOGPROBS),
        "prompt": {"oneOf": [{"type": "string", "minLength": 1}, {"type": "array", "minItems": 1,
                                                                  "items": {"type": "string", "minLength": 1}},
                             tokens, {"type": "array", "minItems": 1, "items": tokens}]}}}
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
    errors = {code: {"description": why, "content": {"application/json": {"schema": {"$ref": "#/components/"
                                                                                  "schemas/Error"}}}}
              for code, why in ERROR_STATUSES.items()}
    any_json = {"application/json": {"schema": {"type": "object"}}}
    generation = {"200": {"description": "The completion, or server-sent events when `stream` is true",
                          "content": {**any_json, "text/event-stream": {"schema": {"type": "string"}}}}, **errors}

    def post(ref: str, summary: str) -> dict:
        return {"post": {"summary": summary, "security": [{"bearer": []}], "requestBody": {
            "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}},
            "responses": generation}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "Switchboard OpenAI-compatible API", "version": "1",
                 "description": f"Base model id: {model_id}. Unknown fields are ignored."},
        "paths": {
            "/v1/chat/completions": post("ChatCompletionRequest", "Chat completion (the model's chat template)"),
            "/v1/completions": post("CompletionRequest", "Text completion"),
            "/v1/models": {"get": {"summary": "The base model and the caller's adapters", "security": [{"bearer": []}],
                                   "responses": {"200": {"description": "A model list", "content": any_json},
                                                 "401": errors["401"], "503": errors["503"]}}},
            "/health": {"get": {"summary": "Liveness", "responses": {
                "200": {"description": "Serving", "content": any_json},
                "503": {"description": "Draining or the engine stopped", "content": any_json}}}},
        },
        "components": {
            "schemas": {"ChatCompletionRequest": chat, "CompletionRequest": completion, "Error": error},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
