"""DoRA (PEFT `LoraConfig(use_dora=True)`): LoRA with a learned magnitude per output feature.

For a targeted projection with base W [out, in], bias b, LoRA B A and scale s, PEFT computes
    y = g * (W x + s B A x) + b,    g = magnitude / ||W + s B A||_row   (per output feature, norm detached)
g depends only on the adapter and the (dequantized, on an NF4 model) base weight, so it is computed once, when
the adapter is filled into a slot, from the base weights the runner binds to the tables (SlotTables.bind_base).
Serving = LoRA's segmented shrink / expand, then one per-token multiply by the slot's gain (plus (1 - g) b where
the base has a bias).

Files: PEFT's LoRA directory with `use_dora: true` and a `...<module>.lora_magnitude_vector` [out] tensor next
to each lora_A / lora_B pair.

Tables (per targeted module, created on first use), besides LoRA's (server/adapters/kinds/lora.py):
  gain[module]   [slots + 1, layers, out]   g; row `slots` (and untargeted modules) all ones
  shift[module]  [slots + 1, layers, out]   (1 - g) * b, only for modules whose base has a bias
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from kernels import build_lora_meta
from server.adapters.kinds.base import (
    AdapterFormatError,
    BaseModelMismatch,
    ChunkView,
    ReadLimits,
    Staging,
    token_slots,
)
from server.adapters.kinds.lora import LoraKind, LoraStep, LoraTables, LoraWeights
from server.adapters.kinds.modules import module_tensors
from server.model.args import ModelArgs

MAGNITUDE = "lora_magnitude_vector"
_MAGNITUDE_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\."
                            r"lora_magnitude_vector(?:\.weight)?$")


@dataclass(slots=True)
class DoraWeights:
    lora: LoraWeights
    magnitude: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> [out_features], same keys as lora.a


def dora_gain(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor
              ) -> torch.Tensor:
    """g [out] fp32 = magnitude / ||W + scale * B @ A|| per output row (PEFT's DoraLinearLayer.get_weight_norm)."""
    merged = weight.float() + scale * (b.float() @ a.float())
    return magnitude.float() / torch.linalg.norm(merged, dim=1)


class DoraTables(LoraTables):
    def __init__(self, args: ModelArgs, num_slots: int, max_rank: int, dtype: torch.dtype, device: str) -> None:
        super().__init__(args, num_slots, max_rank, dtype, device)
        self.gain: dict[str, torch.Tensor] = {}
        self.shift: dict[str, torch.Tensor] = {}

    @property
    def no_dora_row(self) -> int:
        return self.num_slots

    def _gain(self, module: str) -> torch.Tensor:
        if module not in self.gain:
            _, n_out = self.args.projection_shape(module)
            shape = (self.args.num_layers, self.num_slots + 1, n_out)  # a layer's rows contiguous: one index_select
            if self.base is not None and self.base(0, module)[1] is not None:
                self.shift[module] = torch.zeros(shape, dtype=self.dtype, device=self.device)  # before gain: see LoRA
            self.gain[module] = torch.ones(shape, dtype=self.dtype, device=self.device)
        return self.gain[module]

    def stage(self, payload: DoraWeights, ready: Staging) -> DoraWeights:
        return DoraWeights(super().stage(payload.lora, ready), {k: ready(t) for k, t in payload.magnitude.items()})

    def ensure(self, payload: DoraWeights) -> None:
        super().ensure(payload.lora)
        for module in payload.lora.target_modules:
            self._gain(module)

    def fill(self, slot: int, payload: DoraWeights) -> None:
        base = self.bound_base("DoRA")
        lora = payload.lora
        gains = {}
        for (layer, module), a in lora.a.items():  # everything that can fail, before the first copy
            weight, bias = base(layer, module)
            g = dora_gain(weight, a, lora.b[(layer, module)], lora.scale, payload.magnitude[(layer, module)])
            gains[(layer, module)] = (g, None if bias is None else (1.0 - g) * bias)
        super().fill(slot, lora)
        for (layer, module), (g, shift) in gains.items():
            self._gain(module)[layer, slot] = g.to(self.dtype)
            if shift is not None:
                self.shift[module][layer, slot] = shift.to(self.dtype)

    def clear(self, slot: int) -> None:
        super().clear(slot)
        for table in self.gain.values():
            table[:, slot].fill_(1.0)
        for table in self.shift.values():
            table[:, slot].zero_()


class DoraStep(LoraStep):
    """LoRA's delta through the segmented kernels, then y = gain * (base + delta) (+ shift) on DoRA tokens."""

    def __init__(self, tables: DoraTables, meta, rows: torch.Tensor) -> None:
        super().__init__(tables, meta)
        self.rows = rows  # [T] int64 gain-table row of each token (no_dora_row = ones)

    def finish(self, y: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """After LoRA's delta (fused per projection group): the gain (and shift) on DoRA tokens."""
        tables: DoraTables = self.tables
        gain = tables.gain.get(module)
        if gain is None:
            return y
        # in place: y is this step's own output. index_select copies rows (advanced indexing took ~3x longer)
        y.mul_(gain[layer].index_select(0, self.rows))
        shift = tables.shift.get(module)
        return y if shift is None else y.add_(shift[layer].index_select(0, self.rows))

    def fused_gains(self, layer: int, modules: tuple[str, ...]) -> list[torch.Tensor | None] | None:
        """The gain rows of this layer for the one compiled call (fp32 tables of unbiased layers; a shift, or
        bf16 tables, keep finish())."""
        tables: DoraTables = self.tables
        if any(m in tables.shift for m in modules):
            return None
        gains = [tables.gain.get(m) for m in modules]
        if any(g is not None and g.dtype != torch.float32 for g in gains):
            return None
        return [None if g is None else g[layer] for g in gains]


class DoraKind(LoraKind):
    name = "DORA"
    peft_types = ("LORA",)  # PEFT's LoRA config with use_dora: true

    def accepts(self, cfg: dict) -> bool:
        return cfg.get("peft_type") == "LORA" and cfg.get("use_dora") is True

    def check_config(self, cfg: dict) -> None:
        super().check_config({**cfg, "use_dora": False})

    def read(self, cfg: dict, tensors: dict[str, torch.Tensor], args: ModelArgs, limits: ReadLimits) -> DoraWeights:
        if cfg.get("use_dora") is not True:
            raise AdapterFormatError(f"a DoRA adapter needs use_dora: true, got {cfg.get('use_dora')!r}")
        if cfg.get("fan_in_fan_out"):
            raise AdapterFormatError("fan_in_fan_out=True is not served for DoRA (Llama projections are Linear)")
        mags = {k: t for k, t in tensors.items() if k.removesuffix(".weight").endswith("." + MAGNITUDE)}
        if not mags:
            raise AdapterFormatError(f"use_dora is set but {MAGNITUDE} tensors are missing")
        rest = {k: t for k, t in tensors.items() if k not in mags}
        lora = super().read({**cfg, "use_dora": False}, rest, args, limits)
        magnitude: dict[tuple[int, str], torch.Tensor] = {}
        for (layer, module, _), t in module_tensors(mags, args, (MAGNITUDE,)).items():
            _, n_out = args.projection_shape(module)
            if t.dim() != 1:
                raise AdapterFormatError(f"{MAGNITUDE} of layer {layer} {module} has shape {tuple(t.shape)}; "
                                         f"it must be a vector")
            if t.shape[0] != n_out:
                raise BaseModelMismatch(f"{MAGNITUDE} of layer {layer} {module} has {t.shape[0]} features; "
                                        f"the base has {n_out}")
            magnitude[(layer, module)] = t
        if magnitude.keys() != lora.a.keys():
            missing = sorted(set(lora.a) ^ set(magnitude))
            raise AdapterFormatError(f"every DoRA module needs lora_A, lora_B and {MAGNITUDE}; unmatched: {missing}")
        return DoraWeights(lora, magnitude)

    def check_tensor_header(self, key: str, shape: tuple[int, ...], args: ModelArgs, limits: ReadLimits) -> bool:
        """The magnitude vectors, from the safetensors header alone (lora_A / lora_B are checked as LoRA's)."""
        m = _MAGNITUDE_KEY.match(key)
        if m is None:
            return False
        layer, module = int(m[1]), m[2]
        if layer >= args.num_layers:
            raise BaseModelMismatch(f"tensor {key!r} addresses layer {layer}; the base has {args.num_layers} layers")
        try:
            _, n_out = args.projection_shape(module)
        except KeyError:
            raise AdapterFormatError(f"unknown target module {module!r} in {key!r}") from None
        if len(shape) != 1:
            raise AdapterFormatError(f"{MAGNITUDE} of layer {layer} {module} has shape {shape}; it must be a vector")
        if shape[0] != n_out:
            raise BaseModelMismatch(f"{MAGNITUDE} of layer {layer} {module} has {shape[0]} features; "
                                    f"the base has {n_out}")
        return True

    def tensors(self, payload: DoraWeights) -> list[torch.Tensor]:
        return [*super().tensors(payload.lora), *payload.magnitude.values()]

    def describe(self, payload: DoraWeights) -> dict:
        return super().describe(payload.lora)

    def new_tables(self, args: ModelArgs, num_slots: int, limits: ReadLimits, dtype: torch.dtype,
                   device: str) -> DoraTables:
        return DoraTables(args, num_slots, limits.max_lora_rank, dtype, device)

    def step(self, tables: DoraTables, chunks: list[ChunkView], num_tokens: int, device: torch.device) -> DoraStep:
        slots = token_slots(chunks, num_tokens, -1, torch.int32)
        rows = token_slots(chunks, num_tokens, tables.no_dora_row)
        return DoraStep(tables, build_lora_meta(slots.to(device), tables.ranks), rows.to(device))
