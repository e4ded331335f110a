"""DoRA (PEFT `LoraConfig(use_dora=True)`): LoRA with a learned magnitude per output feature.

For a targeted projection with base W [out, in], bias b, LoRA B A and scale s, PEFT computes
    y = g * (W x + s B A x) + b,    g = magnitude / ||W + s B A||_row   (per output feature, norm detached)
g depends only on the adapter and the (dequantized, on an NF4 model) base weight, so it is computed once, when
the adapter is filled into a slot, from the base weights the runner binds to the tables (SlotTables.bind_base).
Serving = LoRA's segmented shrink / expand, then one per-token multiply by the slot's gain (plus (1 - g) b where
the base has a bias): a member of the LoRA family (lora.py), its gain an extra of the family's one table set
(lora_extras.py DoraGains), applied inside the family's one kernel call per projection group where it can.

Files: PEFT's LoRA directory with `use_dora: true` and a `...<module>.lora_magnitude_vector` [out] tensor next
to each lora_A / lora_B pair.
"""

from __future__ import annotations

import torch

from server.adapters.kinds.base import AdapterFormatError, AdapterLimits, BaseModelMismatch
from server.adapters.kinds.lora import LoraKind
from server.adapters.kinds.lora_weights import DoraWeights
from server.adapters.kinds.peft_keys import module_key, module_shape, module_tensors
from server.model.args import ModelArgs

MAGNITUDE = "lora_magnitude_vector"


class DoraKind(LoraKind):
    composable = False  # DoRA normalizes per adapter: a weighted DoRA is not a weighted delta
    name = "DORA"
    peft_types = ("LORA",)  # PEFT's LoRA config with use_dora: true

    def accepts(self, cfg: dict) -> bool:
        return cfg.get("peft_type") == "LORA" and cfg.get("use_dora") is True

    def check_config(self, cfg: dict) -> None:
        super().check_config({**cfg, "use_dora": False})

    def read(self, cfg: dict, tensors: dict[str, torch.Tensor], args: ModelArgs, limits: AdapterLimits) -> DoraWeights:
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

    def check_tensor_header(self, key: str, shape: tuple[int, ...], args: ModelArgs, limits: AdapterLimits) -> bool:
        """The magnitude vectors, from the safetensors header alone (lora_A / lora_B: LoRA's check)."""
        parsed = module_key(key)
        if parsed is None or parsed.suffix != MAGNITUDE:
            return super().check_tensor_header(key, shape, args, limits)
        layer, module = parsed.layer, parsed.module
        _, n_out = module_shape(key, parsed, args)
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
