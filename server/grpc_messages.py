"""TokenEvents -> the response messages of the Inference API (switchboard.v1): usage, adapter, timings, logprobs."""

from __future__ import annotations

import time

from server.engine.request import TokenEvent
from switchboard.v1 import inference_pb2 as pb


def logprobs(event: TokenEvent) -> list[pb.TokenLogprob]:
    if not event.logprobs:
        return []
    tops = event.top_logprobs or ((),) * len(event.logprobs)
    return [pb.TokenLogprob(token_id=t, logprob=lp, top=[pb.TopLogprob(token_id=a, logprob=b) for a, b in top])
            for t, lp, top in zip(event.token_ids, event.logprobs, tops, strict=True)]


def usage(event: TokenEvent) -> pb.Usage:
    return pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                    cached_prompt_tokens=event.cached_prompt_tokens)


def adapter(adapter_name: str, event: TokenEvent) -> pb.AdapterRef:
    return pb.AdapterRef(name=adapter_name, version=event.adapter_version or 0)


def parts(refs) -> list[pb.AdapterRef]:
    """A composition's parts (server.compose_api.PartRef): name, version, weight."""
    return [pb.AdapterRef(name=r.name, version=r.version, weight=r.weight) for r in refs]


def timings(arrival_time: float, first: TokenEvent | None, final: bool) -> pb.Timings:
    t = pb.Timings()
    if first is not None and first.queue_s is not None:
        t.queue_ms = first.queue_s * 1e3
    if first is not None and first.ttft_s is not None:
        t.ttft_ms = first.ttft_s * 1e3
    if final:
        t.total_ms = (time.monotonic() - arrival_time) * 1e3
    return t
