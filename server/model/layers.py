"""Building blocks of a Llama-family decoder: RMSNorm, rotary embeddings, adapter-aware projections."""

from __future__ import annotations

import math

import torch
from torch import nn

import kernels
from server.model.args import ModelArgs
from server.model.batch import StepAdapter


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 as transformers does (kernels/pointwise.py)."""

    def __init__(self, weight: torch.Tensor, eps: float, backend: kernels.KernelBackend | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [hidden]
        self.eps = eps
        self.kernels = backend or kernels.backend(weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)


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
    """Rotary embeddings (rotate-half convention of HF Llama) at arbitrary per-token positions: the step's cos/sin
    tables here, applied to q and k by the kernel backend's rope_and_cache."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [head_dim/2] fp32

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, factor: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """factor [T] fp32: per-token linear interpolation (inv_freq / factor), None = the config's RoPE only."""
        inv_freq = self.inv_freq[None, :] if factor is None else self.inv_freq[None, :] / factor[:, None]
        freqs = positions.float()[:, None] * inv_freq  # [T, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim]
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos[:, None, :], sin[:, None, :]  # [T, 1, head_dim] each


def project_group(projections: tuple[Projection, ...], x: torch.Tensor, adapters: list[StepAdapter]
                  ) -> list[torch.Tensor]:
    """[p(x, adapters) for p in projections] for projections of one input (q/k/v, gate/up; one for o and down),
    with the adapters' output hooks called once for the group (StepAdapter.project_outputs), or, when the step has
    one StepAdapter (one kind family) and it can, base and adapter work in one pass (StepAdapter.project_with_base)."""
    if not adapters:
        return [p.base(x) for p in projections]
    layer, names = projections[0].layer, tuple(p.name for p in projections)
    if len(adapters) == 1:
        fused = adapters[0].project_with_base(x, [p.base for p in projections], layer, names)
        if fused is not None:
            return fused
    ys = []
    for p in projections:
        x_in = x
        for adapter in adapters:
            x_in = adapter.project_input(x_in, p.layer, p.name)
        ys.append(p.base(x_in))
    for adapter in adapters:
        ys = adapter.project_outputs(x, ys, layer, names)
    return ys


class Projection(nn.Module):
    """A base linear (NF4 or dense) with the step's adapters at its input and output.

    Semantics, for the step's adapters h_1..h_n (server/model/batch.py StepAdapter, in kind registration
    order), each touching only its own sequences' rows:
      x' = h_n.project_input(... h_1.project_input(x))
      y  = base(x');  y = h_k.project_output(x, y) for k = 1..n
    e.g. a scaling kind multiplies x' or y; a low-rank kind adds its delta to y.
    """

    def __init__(self, base: nn.Module, layer: int, name: str) -> None:
        super().__init__()
        self.base = base
        self.layer = layer
        self.name = name

    def forward(self, x: torch.Tensor, adapters: list[StepAdapter]) -> torch.Tensor:
        if not adapters:
            return self.base(x)
        return project_group((self,), x, adapters)[0]
