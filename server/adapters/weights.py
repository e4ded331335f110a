"""Adapters in one normalized, framework-free form: what the PEFT reader produces and the pool loads.

Every kind is plain data; the pool copies it into preallocated device slots and the model reads the
slots through the per-batch metadata (server/engine/batch.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import torch


class AdapterKind(StrEnum):
    LORA = "LORA"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    IA3 = "IA3"


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
class PromptWeights:
    """Virtual-token embeddings prepended to the input embeddings (prompt tuning and P-tuning)."""

    embeddings: torch.Tensor  # [n_virtual, hidden]


@dataclass(slots=True)
class PrefixWeights:
    """Learned K/V prepended to every layer's cache; no RoPE applied to them (as in PEFT)."""

    keys: torch.Tensor  # [layers, n_virtual, kv_heads, head_dim]
    values: torch.Tensor  # [layers, n_virtual, kv_heads, head_dim]


@dataclass(slots=True)
class IA3Weights:
    """Output scaling (k/v-style modules) or input scaling (feed-forward modules, e.g. down_proj)."""

    scales: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> [out_features] or [in_features]
    feedforward_modules: frozenset[str]  # modules whose *input* is scaled


@dataclass(slots=True)
class AdapterWeights:
    kind: AdapterKind
    config: dict  # the adapter_config.json as read
    lora: LoraWeights | None = None
    prompt: PromptWeights | None = None
    prefix: PrefixWeights | None = None
    ia3: IA3Weights | None = None
    base_model: str | None = None  # base_model_name_or_path from the config
    meta: dict = field(default_factory=dict)

    @property
    def num_virtual_tokens(self) -> int:
        if self.prompt is not None:
            return self.prompt.embeddings.shape[0]
        if self.prefix is not None:
            return self.prefix.keys.shape[1]
        return 0

    def nbytes(self) -> int:
        tensors: list[torch.Tensor] = []
        if self.lora:
            tensors += [*self.lora.a.values(), *self.lora.b.values()]
        if self.prompt:
            tensors.append(self.prompt.embeddings)
        if self.prefix:
            tensors += [self.prefix.keys, self.prefix.values]
        if self.ia3:
            tensors += list(self.ia3.scales.values())
        return sum(t.numel() * t.element_size() for t in tensors)
