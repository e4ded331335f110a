"""The per-step batch description that the runner fills and every layer reads.

One `ForwardBatch` describes a mix of prefill chunks and single decode tokens of many sequences,
each possibly with its own adapter. Tokens are laid out sequence after sequence ("flat"); the
attention metadata pads them per sequence for one batched attention call.

Adapters reach the model only as `StepAdapter`s: one object per adapter kind present in the step,
called at the model's application points (input embeddings, a projection's input, a projection's
output, a decoder sub-block's output before it joins the residual stream). The model never knows which
kinds exist (server/adapters/kinds/ does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class AttentionMeta:
    kv_write_slots: torch.Tensor  # [T] int64 flat KV-cache slot each token's K/V is written to
    query_index: torch.Tensor  # [B, q_max] int64 index into the T tokens (padding points at token 0)
    query_valid: torch.Tensor  # [B, q_max] bool
    kv_slots: torch.Tensor  # [B, kv_max] int64 KV-cache slots of each sequence's context (padded with 0)
    mask: torch.Tensor  # [B, 1, q_max, kv_max] bool, True = attend (causal over the context)


class StepAdapter:
    """One adapter kind's contribution to a step. Every hook defaults to "leave the tensor alone".

    Rows are the step's T flat tokens; a kind changes only the rows of the sequences that use it.
    """

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        """h [T, hidden] input embeddings -> embeddings (e.g. virtual-token rows replaced)."""
        return h

    def project_input(self, x: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """x [T, in] -> what the base projection `module` of `layer` multiplies."""
        return x

    def project_output(self, x: torch.Tensor, y: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """y [T, out] base output (x [T, in] its original input) -> the projection's output."""
        return y

    def block_output(self, residual: torch.Tensor, out: torch.Tensor, layer: int, block: str) -> torch.Tensor:
        """out [T, hidden] the output of sub-block `block` ("attention" or "mlp") of `layer`, residual [T, hidden]
        the stream it is added to (the sub-block's input before its norm) -> what is added: the layer computes
        residual + block_output(residual, out). Called for each adapter in turn, each changing its own rows."""
        return out


@dataclass(slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64 (virtual tokens carry 0; an embed hook fills their rows)
    positions: torch.Tensor  # [T] int64 RoPE positions (index in the sequence's context)
    attention: AttentionMeta
    logits_index: torch.Tensor  # [S] int64 token whose logits are sampled, one per sampled sequence
    adapters: list[StepAdapter] = field(default_factory=list)  # the kinds present in this step
