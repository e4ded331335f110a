"""The LoRA family's payloads (host copies read from PEFT files): plain LoRA, and LoRA with DoRA's or LongLoRA's
per-slot extras. All three fill the one table set of server/adapters/kinds/lora_tables.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class LoraWeights:
    """y += scale * (x @ A^T) @ B^T on each (layer, module) present."""

    rank: int
    scale: float  # alpha / r, or alpha / sqrt(r) with use_rslora
    a: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> [rank, in_features]
    b: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> [out_features, rank]

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(sorted({m for _, m in self.a}))


@dataclass(slots=True)
class DoraWeights:
    """LoRA plus DoRA's learned magnitude per output feature (server/adapters/kinds/dora.py)."""

    lora: LoraWeights
    magnitude: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> [out_features], same keys as lora.a


@dataclass(slots=True)
class LongLoraWeights:
    """LoRA plus LongLoRA's trained norms / embedding table and RoPE factor (server/adapters/kinds/longlora.py)."""

    lora: LoraWeights
    norms: dict[tuple[int, str], torch.Tensor]  # (layer, name) -> [hidden]; the final norm is (num_layers, "norm")
    embed: torch.Tensor | None  # [vocab, hidden] the trained embedding table, None = the base's
    factor: float  # RoPE linear interpolation factor, 1.0 = none


FamilyWeights = LoraWeights | DoraWeights | LongLoraWeights


def lora_part(payload: FamilyWeights) -> LoraWeights:
    """The LoRA A / B of any family payload."""
    return payload if isinstance(payload, LoraWeights) else payload.lora
