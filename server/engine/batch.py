"""The per-step batch description that the runner fills and every layer reads.

One `ForwardBatch` describes a mix of prefill chunks and single decode tokens of many sequences,
each possibly with its own adapter. Tokens are laid out sequence after sequence ("flat"); the
attention metadata pads them per sequence for one batched attention call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMeta:
    kv_write_slots: torch.Tensor  # [T] int64 flat KV-cache slot each token's K/V is written to
    query_index: torch.Tensor  # [B, q_max] int64 index into the T tokens (padding points at token 0)
    query_valid: torch.Tensor  # [B, q_max] bool
    kv_slots: torch.Tensor  # [B, kv_max] int64 KV-cache slots of each sequence's context (padded with 0)
    mask: torch.Tensor  # [B, 1, q_max, kv_max] bool, True = attend (causal over the context)


@dataclass(slots=True)
class AdapterBatch:
    """Adapter routing for this step; None fields mean no adapter of that kind in the batch."""

    lora_meta: object | None  # kernels.meta.LoraBatchMeta over the T tokens (slot -1 = no LoRA)
    ia3_rows: torch.Tensor | None  # [T] int64 row of the IA3 tables (the last row is all ones)
    virtual_index: torch.Tensor | None  # [T] int64 row of virtual_embeds, -1 = a real token
    virtual_embeds: torch.Tensor | None  # [Nv, hidden] prompt-tuning / P-tuning embeddings used here


@dataclass(slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64 (virtual tokens carry 0; see adapters.virtual_index)
    positions: torch.Tensor  # [T] int64 RoPE positions (index in the sequence's context)
    attention: AttentionMeta
    logits_index: torch.Tensor  # [S] int64 token whose logits are sampled, one per sampled sequence
    adapters: AdapterBatch | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
