"""The LoRA family's optional per-slot extras, kept beside the one LoRA table set (lora_tables.py):

DoRA (DoraGains)      g = magnitude / ||W + s B A||_row per output feature, computed once at fill from the base
  gain[module]  [layers, slots + 1, out]   g; row `slots` (and every slot without DoRA) all ones
  shift[module] [layers, slots + 1, out]   (1 - g) * b, only for modules whose base has a bias
LongLoRA (LongLoraSlots)
  norm    [slots + 1, 2 * layers + 1, hidden]  the base's RMSNorm weights in row `slots` and wherever an adapter
          leaves a norm alone (index 2 i: input norm of layer i, 2 i + 1: its post-attention norm, 2 layers: final)
  embed   [slots, vocab, hidden]               the slot's whole embedding table (only for adapters that train it)
  factor  host list [slots]                    RoPE interpolation factor (1.0 = none)

Each extra's tables are created on first use (a server without a DoRA or LongLoRA adapter pays nothing), and
`holds[slot]` says on the host which slots use it, so a step without such a slot skips it entirely.
"""

from __future__ import annotations

import torch

from server.adapters.kinds.base import BaseWeights
from server.adapters.kinds.lora_weights import DoraWeights, LongLoraWeights
from server.model.args import ModelArgs

NORMS = ("input_layernorm", "post_attention_layernorm")


def dora_gain(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor
              ) -> torch.Tensor:
    """g [out] fp32 = magnitude / ||W + scale * B @ A|| per output row (PEFT's DoraLinearLayer.get_weight_norm)."""
    merged = weight.float() + scale * (b.float() @ a.float())
    return magnitude.float() / torch.linalg.norm(merged, dim=1)


def norm_index(args: ModelArgs, layer: int, name: str) -> int:
    """Row of a norm in LongLoRA's `norm` table (see the module docstring)."""
    if name == "norm":
        return 2 * args.num_layers
    return 2 * layer + (0 if name == "input_layernorm" else 1)


class DoraGains:
    def __init__(self, args: ModelArgs, num_slots: int, dtype: torch.dtype, device: str) -> None:
        self.args, self.num_slots, self.dtype, self.device = args, num_slots, dtype, device
        self.gain: dict[str, torch.Tensor] = {}
        self.shift: dict[str, torch.Tensor] = {}
        self.holds: list[bool] = [False] * num_slots

    @property
    def neutral_row(self) -> int:
        """The all-ones row every token outside the family reads."""
        return self.num_slots

    def _gain(self, module: str, base: BaseWeights | None) -> torch.Tensor:
        if module not in self.gain:
            _, n_out = self.args.projection_shape(module)
            shape = (self.args.num_layers, self.num_slots + 1, n_out)  # a layer's rows contiguous: one index_select
            if base is not None and base(0, module)[1] is not None:
                self.shift[module] = torch.zeros(shape, dtype=self.dtype, device=self.device)  # before gain (LoRA's)
            self.gain[module] = torch.ones(shape, dtype=self.dtype, device=self.device)
        return self.gain[module]

    def ensure(self, payload: DoraWeights, base: BaseWeights | None) -> None:
        for module in payload.lora.target_modules:
            self._gain(module, base)

    def gains(self, payload: DoraWeights, base: BaseWeights) -> dict[tuple[int, str], tuple[torch.Tensor, ...]]:
        """(layer, module) -> (g [out], shift [out] or None): everything of a fill that can fail, before any copy."""
        lora = payload.lora
        out = {}
        for (layer, module), a in lora.a.items():
            weight, bias = base(layer, module)
            g = dora_gain(weight, a, lora.b[(layer, module)], lora.scale, payload.magnitude[(layer, module)])
            out[(layer, module)] = (g, None if bias is None else (1.0 - g) * bias)
        return out

    def fill(self, slot: int, gains: dict[tuple[int, str], tuple[torch.Tensor, ...]], base: BaseWeights) -> None:
        for (layer, module), (g, shift) in gains.items():
            self._gain(module, base)[layer, slot] = g.to(self.dtype)
            if shift is not None:
                self.shift[module][layer, slot] = shift.to(self.dtype)
        self.holds[slot] = True

    def clear(self, slot: int) -> None:
        for table in self.gain.values():
            table[:, slot].fill_(1.0)
        for table in self.shift.values():
            table[:, slot].zero_()
        self.holds[slot] = False


class LongLoraSlots:
    def __init__(self, args: ModelArgs, num_slots: int, dtype: torch.dtype, device: str) -> None:
        self.args, self.num_slots, self.dtype, self.device = args, num_slots, dtype, device
        self.norm: torch.Tensor | None = None
        self.embed: torch.Tensor | None = None
        self.has_embed: list[bool] = [False] * num_slots
        self.factor: list[float] = [1.0] * num_slots
        self.holds: list[bool] = [False] * num_slots

    @property
    def base_row(self) -> int:
        return self.num_slots

    def _base_norms(self, base: BaseWeights) -> torch.Tensor:
        """[2 * layers + 1, hidden] the base's norm weights, in table order."""
        rows = [base(i, n)[0] for i in range(self.args.num_layers) for n in NORMS]
        return torch.stack([*rows, base(self.args.num_layers, "norm")[0]])

    def ensure(self, payload: LongLoraWeights, base: BaseWeights) -> None:
        if self.norm is None:
            norms = self._base_norms(base).to(self.dtype)
            self.norm = norms.to(self.device)[None].repeat(self.num_slots + 1, 1, 1).contiguous()
        if payload.embed is not None and self.embed is None:
            self.embed = torch.zeros(self.num_slots, *payload.embed.shape, dtype=self.dtype, device=self.device)

    def fill(self, slot: int, payload: LongLoraWeights, base: BaseWeights) -> None:
        self.ensure(payload, base)
        for (layer, name), w in payload.norms.items():
            self.norm[slot, norm_index(self.args, layer, name)] = w.to(self.dtype)
        if payload.embed is not None:
            self.embed[slot] = payload.embed.to(self.dtype)
            self.has_embed[slot] = True
        self.factor[slot] = payload.factor
        self.holds[slot] = True

    def clear(self, slot: int) -> None:
        if self.norm is not None:
            self.norm[slot] = self.norm[self.base_row]
        if self.embed is not None and self.has_embed[slot]:
            self.embed[slot].zero_()
        self.has_embed[slot] = False
        self.factor[slot] = 1.0
        self.holds[slot] = False
