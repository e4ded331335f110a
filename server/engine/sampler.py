"""Per-sequence sampling: greedy, temperature, top-k, top-p, seeded generators."""

from __future__ import annotations

import torch

from server.engine.request import SamplingParams


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits [V] with top-k / top-p (nucleus) filtered entries set to -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop tokens whose preceding cumulative mass already reaches top_p (always keeps the first)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,  # [S, V] fp32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """One token per row. temperature 0 = argmax; otherwise a draw from the row's own generator,
    so a seeded request gives the same tokens whatever else is in the batch."""
    tokens = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.temperature > 0:
            probs = torch.softmax(filter_logits(logits[i], p), dim=-1)
            tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return tokens
