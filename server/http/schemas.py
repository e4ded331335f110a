"""OpenAI request bodies -> what the engine needs, with every invalid value a 400 that names its field.

Unknown fields are ignored (as OpenAI does). Values follow OpenAI's ranges; the vLLM extras (`top_k`,
`min_p`, `repetition_penalty`, `ignore_eos`, `min_tokens`, `cache_salt`) and the `adapter` field are accepted too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from server.compose_api import PartSpec, parse_json
from server.engine.request import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, InvalidRequest, SamplingParams
from server.http.errors import invalid
from server.http.tools import message_fields
from server.lifecycle import check_sampling

MAX_N = 16
MAX_STOP = 16
MAX_SEQUENCES = 64  # prompts x n: the engine sequences one request may start
MAX_ALTERNATIVES = 64  # n x top_logprobs: the alternatives reported per generated position, all choices together
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default; chat defaults to the room left
CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")
# engine field -> the OpenAI parameter a client set (for messages coming back from SamplingParams.validate)
ENGINE_TO_PARAM = {"max_new_tokens": "max_tokens", "stop strings": "stop", "at most": "stop"}


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """One validated /v1/chat/completions or /v1/completions body."""

    chat: bool
    model: str
    adapter: str | None  # the extra `adapter` field; None = take it from `model`
    prompts: list[str | list[int]]  # completions: strings or token-id lists; chat: empty
    messages: list[dict]  # chat: [{"role", "content"}]; completions: empty
    sampling: SamplingParams  # max_new_tokens is 0 when the client left it to the server
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    echo: bool
    tokens_as_ids: bool  # vLLM's `return_tokens_as_token_ids`: logprob tokens as "token_id:N"
    cache_salt: str | None = None  # vLLM's extra `cache_salt`: prefix-cache reuse only among requests with it
    adapters: tuple[PartSpec, ...] = ()  # the extra `adapters` composition (server/compose_api.py)


def _number(body: dict, name: str, default: float, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"'{name}' must be a number, got {type(value).__name__}", name, "invalid_type")
    if not math.isfinite(value):
        raise invalid(f"'{name}' must be a finite number, got {value}", name)
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        span = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise invalid(f"'{name}' must be in {span}, got {value}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None
             ) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{name}' must be an integer, got {type(value).__name__}", name, "invalid_type")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise invalid(f"'{name}' must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}", name)
    return value


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be a boolean, got {type(value).__name__}", name, "invalid_type")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP:
        raise invalid(f"'stop' has {len(stops)} strings; at most {MAX_STOP}", "stop")
    if any(not s for s in stops):
        raise invalid("'stop' strings must be non-empty", "stop")
    return tuple(stops)


def _logit_bias(body: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise invalid("'logit_bias' must be an object mapping token ids to biases", "logit_bias", "invalid_type")
    if len(bias) > MAX_LOGIT_BIAS:  # before reading any entry: a whole vocabulary is refused at once
        raise invalid(f"'logit_bias' has {len(bias)} entries; at most {MAX_LOGIT_BIAS}", "logit_bias")
    out = []
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise invalid(f"'logit_bias' key {key!r} is not a token id", "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise invalid(f"'logit_bias' token id {token} is outside the vocabulary [0, {vocab_size})", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or not -100 <= value <= 100:
            raise invalid(f"'logit_bias' value for token {token} must be a number in [-100, 100], got {value!r}",
                          "logit_bias")
        out.append((token, float(value)))
    return tuple(sorted(out))


def _content(value, where: str) -> str:
    """A message's content: a string, or a list of text parts (OpenAI's content-part form)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"'{where}[{j}]' must be a text part {{\"type\": \"text\", \"text\": ...}} "
                              "(this server takes text only)", where)
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"'{where}' must be a string or a list of text parts", where, "invalid_type")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise invalid("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"'messages[{i}]' must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"'messages[{i}].role' must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                          f"messages[{i}].role")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(m.get("content"), f"messages[{i}].content"), **message_fields(m, i)})
    if len(out) == 1 and not out[0]["content"]:
        raise invalid("the prompt is empty: 'messages[0].content' is empty", "messages[0].content")
    return out


def _prompts(body: dict) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid("'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
            for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise invalid("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists "
                      "(none of them empty)", "prompt", "invalid_type")
    if any(p == "" for p in prompts):
        raise invalid("the prompt is empty", "prompt")
    return prompts


def parse(body: object, *, chat: bool, vocab_size: int, max_new_tokens_limit: int) -> ParsedRequest:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    adapters = _adapters(body)
    if adapters and not model:
        model = "+".join(a.name for a in adapters)  # echoed back as the response's model
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required: the base model's id, 'base', or an adapter name", "model",
                      "missing_required_parameter")
    adapter = body.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise invalid("'adapter' must be a string", "adapter", "invalid_type")
    messages, prompts = (_messages(body), []) if chat else ([], _prompts(body))
    max_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, max_name, None, 1, max_new_tokens_limit)
    if max_tokens is None and not chat:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = _boolean(options or {}, "include_usage")
    if options is not None and not stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if chat:
        logprobs = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if top and not logprobs:
            raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:  # completions: `logprobs` is the number of alternatives (0..5 in OpenAI; up to 20 here)
        top = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        logprobs, top = top is not None, top or 0
    seed = _integer(body, "seed", None, 0, 2**63 - 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    sampling = SamplingParams(
        max_new_tokens=max_tokens or 0,
        temperature=temperature,
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_top_k(body),
        seed=seed,
        stop=_stop(body),
        ignore_eos=_boolean(body, "ignore_eos"),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 100.0, lo_open=True),
        logit_bias=_logit_bias(body, vocab_size),
        min_tokens=_integer(body, "min_tokens", 0, 0, max_new_tokens_limit),
        logprobs=logprobs,
        top_logprobs=top,
    )
    if max_tokens is not None and sampling.min_tokens > max_tokens:
        raise invalid(f"'min_tokens' ({sampling.min_tokens}) must not exceed '{max_name}' ({max_tokens})",
                      "min_tokens")
    n = _integer(body, "n", 1, 1, MAX_N)
    if n * top > MAX_ALTERNATIVES:
        name = "top_logprobs" if chat else "logprobs"
        raise invalid(f"'n' x '{name}' is {n} x {top}; at most {MAX_ALTERNATIVES} alternatives per position", name)
    if len(prompts) * n > MAX_SEQUENCES:
        raise invalid(f"{len(prompts)} prompts x 'n' {n} would start {len(prompts) * n} sequences; at most "
                      f"{MAX_SEQUENCES} per request", "prompt")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("'user' must be a string", "user", "invalid_type")
    echo = _boolean(body, "echo") if not chat else False
    cache_salt = body.get("cache_salt")
    if cache_salt is not None and (not isinstance(cache_salt, str) or not 0 < len(cache_salt) <= 256):
        raise invalid("'cache_salt' must be a non-empty string of at most 256 characters", "cache_salt")
    return ParsedRequest(chat=chat, model=model, adapter=adapter or None, prompts=prompts, messages=messages,
                         sampling=sampling, n=n, stream=stream, include_usage=include_usage, logprobs=logprobs,
                         top_logprobs=top, echo=echo, tokens_as_ids=_boolean(body, "return_tokens_as_token_ids"),
                         cache_salt=cache_salt, adapters=adapters)


def _adapters(body: dict) -> tuple[PartSpec, ...]:
    value = body.get("adapters")
    if value is None:
        return ()
    try:
        return tuple(parse_json(value))
    except InvalidRequest as exc:
        raise invalid(str(exc), "adapters") from None


def _top_k(body: dict) -> int:
    top_k = _integer(body, "top_k", 0, -1, None)
    return 0 if top_k == -1 else top_k  # vLLM: -1 (or 0) = off


def finalize(sampling: SamplingParams, prompt_len: int, engine) -> SamplingParams:
    """Fill the server-chosen max_new_tokens (chat without max_tokens: the room left, as vLLM), then the one
    sampling check both faces share (server.lifecycle.check_sampling); its message's field becomes the
    OpenAI parameter the client set (`param`)."""
    if sampling.max_new_tokens == 0:
        limit = engine.config.max_new_tokens_limit
        room = max(1, min(limit, engine.max_model_len - prompt_len))
        sampling = dataclasses.replace(sampling, max_new_tokens=room, min_tokens=min(sampling.min_tokens, room))
    try:
        check_sampling(sampling, engine)
    except InvalidRequest as exc:
        message = str(exc)
        first = message.split(" ")[0]
        param = ENGINE_TO_PARAM.get(first, first if first in SamplingParams.__slots__ else None)
        raise invalid(message, param) from None
    return sampling
