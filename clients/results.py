"""Typed results of the client calls (plain frozen dataclasses, converted from the protos)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float  # under the model's raw distribution
    top: list[tuple[int, float]]  # (token id, logprob), most likely first

    @classmethod
    def list_from_proto(cls, items) -> list[TokenLogprob]:
        return [cls(x.token_id, x.logprob, [(t.token_id, t.logprob) for t in x.top]) for x in items]


@dataclass(frozen=True, slots=True)
class GenerateResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    adapter_name: str  # "tenant/name", "" for the base model
    adapter_version: int  # 0 for the base model
    queue_ms: float
    ttft_ms: float
    total_ms: float
    request_id: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when the request asked for them
    cached_prompt_tokens: int = 0  # of prompt_tokens, those served from the prefix cache
    adapters: list[tuple[str, int, float]] = field(default_factory=list)  # a composition: (name, version, weight)

    @classmethod
    def from_proto(cls, r) -> GenerateResult:
        return cls(text=r.text, token_ids=list(r.token_ids), finish_reason=r.finish_reason,
                   prompt_tokens=r.usage.prompt_tokens, completion_tokens=r.usage.completion_tokens,
                   adapter_name=r.adapter.name, adapter_version=r.adapter.version, queue_ms=r.timings.queue_ms,
                   ttft_ms=r.timings.ttft_ms, total_ms=r.timings.total_ms, request_id=r.request_id,
                   logprobs=TokenLogprob.list_from_proto(r.logprobs),
                   cached_prompt_tokens=r.usage.cached_prompt_tokens,
                   adapters=[(a.name, a.version, a.weight) for a in r.adapters])


@dataclass(frozen=True, slots=True)
class StreamChunk:
    text: str  # delta; never splits a multi-byte character
    token_ids: list[int]
    finished: bool
    finish_reason: str  # on the last chunk
    prompt_tokens: int  # on the last chunk
    completion_tokens: int  # on the last chunk
    adapter_name: str  # on the last chunk
    adapter_version: int  # on the last chunk
    queue_ms: float  # on the first and the last chunk
    ttft_ms: float  # on the first and the last chunk
    total_ms: float  # on the last chunk
    request_id: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per token_ids entry, when asked for
    cached_prompt_tokens: int = 0  # on the last chunk
    adapters: list[tuple[str, int, float]] = field(default_factory=list)  # last chunk: (name, version, weight)

    @classmethod
    def from_proto(cls, c) -> StreamChunk:
        return cls(text=c.text, token_ids=list(c.token_ids), finished=c.finished, finish_reason=c.finish_reason,
                   prompt_tokens=c.usage.prompt_tokens, completion_tokens=c.usage.completion_tokens,
                   adapter_name=c.adapter.name, adapter_version=c.adapter.version, queue_ms=c.timings.queue_ms,
                   ttft_ms=c.timings.ttft_ms, total_ms=c.timings.total_ms, request_id=c.request_id,
                   logprobs=TokenLogprob.list_from_proto(c.logprobs), cached_prompt_tokens=c.usage.cached_prompt_tokens,
                   adapters=[(a.name, a.version, a.weight) for a in c.adapters])


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    name: str
    tenant: str
    version: int
    versions: list[int]
    kind: str  # the adapter kind's name as the server reports it (its registered kinds)
    rank: int
    target_modules: list[str]
    size_bytes: int
    created_at: float  # unix seconds
    shared: bool
    residency: str  # "disk" | "host" | "device"

    @classmethod
    def from_proto(cls, a) -> AdapterInfo:
        return cls(name=a.name, tenant=a.tenant, version=a.version, versions=list(a.versions), kind=a.kind,
                   rank=a.rank, target_modules=list(a.target_modules), size_bytes=a.size_bytes,
                   created_at=a.created_at, shared=a.shared, residency=a.residency)


@dataclass(frozen=True, slots=True)
class UsageRow:
    tenant: str
    adapter: str  # "owner/name", "" for the base model
    minute: int  # unix seconds of the minute's start
    prompt_tokens: int
    completion_tokens: int
    requests: int
    cached_prompt_tokens: int = 0  # of prompt_tokens, those served from the prefix cache


@dataclass(frozen=True, slots=True)
class UsageReport:
    rows: list[UsageRow]
    prompt_tokens: int
    completion_tokens: int
    requests: int
    cached_prompt_tokens: int = 0

    @classmethod
    def from_proto(cls, r) -> UsageReport:
        rows = [UsageRow(x.tenant, x.adapter, x.minute, x.prompt_tokens, x.completion_tokens, x.requests,
                         x.cached_prompt_tokens) for x in r.rows]
        return cls(rows, r.prompt_tokens, r.completion_tokens, r.requests, r.cached_prompt_tokens)
