"""Building blocks of a Llama-family decoder: RMSNorm, rotary embeddings, adapter-aware projections."""

from __future__ import annotations

import math

import torch
from torch import nn

from server.engine.batch import AdapterBatch
from server.model.args import ModelArgs


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 as transformers does."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [hidden]
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the attention scaling for the config's rope type."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"rope_type {kind!r} is not supported (default, linear, llama3 are)")


class Rotary(nn.Module):
    """Rotary embeddings (rotate-half convention of HF Llama) at arbitrary per-token positions."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [head_dim/2] fp32

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim]
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos[:, None, :], sin[:, None, :]  # [T, 1, head_dim] each

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, head_dim] -> rotated."""
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


class Projection(nn.Module):
    """A base linear (NF4 or dense) plus this batch's adapters for the tokens routed to them.

    Semantics, per token i with adapter slot s(i) (none = base only):
      IA3 (input-scaled module):  y_i = base(x_i * l_in[s(i)])
      IA3 (output-scaled module): y_i = base(x_i) * l_out[s(i)]
      LoRA:                       y_i = base(x_i) + scale[s(i)] * (x_i @ A[s(i)]^T) @ B[s(i)]^T
    The adapter tables are the pool's preallocated stacked tensors (server/adapters/slots.py).
    """

    def __init__(self, base: nn.Module, layer: int, name: str, tables: object | None) -> None:
        super().__init__()
        self.base = base
        self.layer = layer
        self.name = name
        self.tables = tables  # server.adapters.slots.AdapterTables, shared by all projections
        self._lora_views: tuple[torch.Tensor, object, object] | None = None  # (table, A views, B views)

    def _views(self, a_table: torch.Tensor, b_table: torch.Tensor):
        """This layer's per-slot LoRA views, made once per table (tables are never reallocated)."""
        if self._lora_views is None or self._lora_views[0] is not a_table:
            from kernels import SlotViews

            self._lora_views = (a_table, SlotViews(a_table[:, self.layer], 1), SlotViews(b_table[:, self.layer], 2))
        return self._lora_views[1], self._lora_views[2]

    def forward(self, x: torch.Tensor, adapters: AdapterBatch | None) -> torch.Tensor:
        tables = self.tables
        if adapters is None or tables is None:
            return self.base(x)
        if adapters.ia3_rows is not None:
            ia3_in = tables.ia3_in.get(self.name)
            if ia3_in is not None:
                x_base = x * ia3_in[adapters.ia3_rows, self.layer]
                y = self.base(x_base)
            else:
                y = self.base(x)
            ia3_out = tables.ia3_out.get(self.name)
            if ia3_out is not None:
                y = y * ia3_out[adapters.ia3_rows, self.layer]
        else:
            y = self.base(x)
        meta = adapters.lora_meta
        if meta is not None and meta.has_lora and self.name in tables.lora_a:
            from kernels import lora_expand, lora_shrink

            a_table, b_table = tables.lora_a[self.name], tables.lora_b[self.name]
            a_views, b_views = self._views(a_table, b_table)
            t = lora_shrink(x, a_views.stack, meta, a_views)
            y = lora_expand(t, b_views.stack, tables.lora_scale, meta, y, b_views)
        return y
