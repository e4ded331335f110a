"""The per-step batch description that the runner fills and every layer reads.

One `ForwardBatch` describes a mix of prefill chunks and single decode tokens of many sequences,
each possibly with its own adapter. Tokens are laid out sequence after sequence ("flat"); attention
reads each sequence's context from the paged KV cache in place through its block table.

Adapters reach the model only as `StepAdapter`s: one object per adapter kind family present in the step,
called at the model's application points (input embeddings, a projection's input, a projection's
output, a decoder sub-block's output before it joins the residual stream). The model never knows which
kinds exist (server/adapters/kinds/ does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kernels.attention import PagedAttentionMeta


@dataclass(slots=True)
class AttentionMeta:
    kv_write_slots: torch.Tensor  # [T] int64 flat KV-cache slot each token's K/V is written to
    paged: PagedAttentionMeta  # each sequence's query rows, context length and block table (read in place)


class StepAdapter:
    """One adapter kind's contribution to a step. Every hook defaults to "leave the tensor alone".

    Rows are the step's T flat tokens; a kind changes only the rows of the sequences that use it.
    """

    def embed_tokens(self, input_ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """input_ids [T] int64, h [T, hidden] the base embedding rows -> rows (e.g. a trained embedding table's)."""
        return h

    def rope_factor(self, factor: torch.Tensor | None) -> torch.Tensor | None:
        """factor [T] fp32 per-token linear position-interpolation factor (None: 1 for every token) -> factor;
        RoPE rotates a token by position * inv_freq / factor (transformers' "linear" rope scaling)."""
        return factor

    def norm(self, x: torch.Tensor, y: torch.Tensor, layer: int, name: str, rows: torch.Tensor | None
             ) -> torch.Tensor:
        """y [n, hidden] the base RMSNorm `name` ("input_layernorm", "post_attention_layernorm"; "norm" with
        layer = num_layers for the final one) of x [n, hidden] -> the norm's output; rows [n] int64 the flat
        token of each row (None: the step's T tokens in order)."""
        return y

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        """h [T, hidden] input embeddings -> embeddings (e.g. virtual-token rows replaced)."""
        return h

    def project_input(self, x: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """x [T, in] -> what the base projection `module` of `layer` multiplies."""
        return x

    def project_output(self, x: torch.Tensor, y: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """y [T, out] base output (x [T, in] its original input) -> the projection's output."""
        return y

    def project_outputs(self, x: torch.Tensor, ys: list[torch.Tensor], layer: int, modules: tuple[str, ...]
                        ) -> list[torch.Tensor]:
        """Several projections of the same input x (q/k/v, gate/up) at once; the same math as project_output on
        each (a kind may share work between them, e.g. one pass over x)."""
        return [self.project_output(x, y, layer, m) for y, m in zip(ys, modules, strict=True)]

    def project_with_base(self, x: torch.Tensor, bases: list[nn.Module], layer: int, modules: tuple[str, ...]
                          ) -> list[torch.Tensor] | None:
        """Asked only when this is the step's one StepAdapter: [base(x) for base in bases] with this kind's
        project_input / project_outputs applied, computed together in one pass (e.g. a memory-bound adapter read
        beside the compute-bound base matmuls), or None (the default) to have the model run them in turn."""
        return None

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
