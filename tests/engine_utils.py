"""Run requests through a real Engine and collect results."""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.engine import Engine
from server.engine.request import FinishReason, GenerationRequest, RequestHandle, SamplingParams


@dataclass
class Result:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    error: str | None


def collect(handle: RequestHandle, timeout: float = 120.0) -> Result:
    tokens: list[int] = []
    text = []
    while True:
        event = handle.get(timeout=timeout)
        tokens += event.token_ids
        text.append(event.text)
        if event.finished:
            return Result(tokens, "".join(text), event.finish_reason, event.error)


def generate(engine: Engine, prompts: list[list[int]], **sampling) -> list[Result]:
    """Submit all prompts at once (one batch) and wait for every result."""
    params = SamplingParams(**sampling)
    handles = [
        engine.submit(GenerationRequest(f"req-{i}-{id(p)}", tuple(p), params)) for i, p in enumerate(prompts)
    ]
    return [collect(h) for h in handles]
