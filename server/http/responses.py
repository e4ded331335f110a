"""OpenAI response objects: chat.completion(.chunk), text_completion, logprobs, usage, SSE framing."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from server.engine.request import TokenEvent


def sse(obj: dict | str) -> bytes:
    """One server-sent event: `data: <json>\\n\\n` (or `data: [DONE]`)."""
    payload = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


@dataclass
class Choice:
    """What one choice accumulated (for the unary response and the stream's bookkeeping)."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, event: TokenEvent) -> None:
        self.text.append(event.text)
        self.token_ids += event.token_ids
        self.logprobs += event.logprobs
        self.top_logprobs += event.top_logprobs
        self.prompt_tokens = event.prompt_tokens or self.prompt_tokens
        self.completion_tokens = event.completion_tokens
        if event.finished:
            self.finish_reason = str(event.finish_reason)


class TokenText:
    """Token id -> its text as logprobs report it (the token decoded alone, as vLLM does), cached."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def as_ids(self, token: int) -> str:
        return f"token_id:{token}"

    def __call__(self, token: int) -> str:
        text = self._cache.get(token)
        if text is None:
            text = self.tokenizer.decode([token])
            if len(self._cache) < 200_000:
                self._cache[token] = text
        return text


def chat_logprobs(tokens: list[int], logprobs: list[float], tops: list, text) -> dict:
    def entry(t: int, lp: float) -> dict:
        s = text(t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    content = []
    for i, (t, lp) in enumerate(zip(tokens, logprobs, strict=True)):
        item = entry(t, lp)
        item["top_logprobs"] = [entry(a, b) for a, b in (tops[i] if i < len(tops) else ())]
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: list[int], logprobs: list[float], tops: list, text,
                        offset: int = 0) -> dict:
    strings = [text(t) for t in tokens]
    offsets = []
    for s in strings:
        offsets.append(offset)
        offset += len(s)
    top = [{text(a): b for a, b in (tops[i] if i < len(tops) else ())} for i in range(len(tokens))]
    return {"tokens": strings, "token_logprobs": list(logprobs), "top_logprobs": top, "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass(frozen=True, slots=True)
class Envelope:
    """The fields every object of one response shares."""

    id: str
    model: str
    chat: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def object(self, chunk: bool) -> str:
        if self.chat:
            return "chat.completion.chunk" if chunk else "chat.completion"
        return "text_completion"

    def wrap(self, choices: list[dict], chunk: bool, usage_: dict | None = None, with_usage: bool = True) -> dict:
        out = {"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model,
               "choices": choices, "system_fingerprint": None}
        if with_usage:
            out["usage"] = usage_
        return out
