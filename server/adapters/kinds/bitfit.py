"""BitFit: trained bias terms only. y = base(x) + delta[s] on each targeted projection (any of the seven).

File format (a PEFT-style directory; PEFT itself has no BitFit type):
  adapter_config.json        {"peft_type": "BITFIT", "target_modules": ["q_proj", ...],
                              "base_model_name_or_path": ...}   (other keys are ignored)
  adapter_model.safetensors  one float vector [out_features] per adapted projection, keyed like the base
                             model's own parameters: `model.layers.<i>.self_attn.q_proj.bias`,
                             `model.layers.<i>.mlp.down_proj.bias`, ...
Each vector is the *change* to that projection's bias: on a base without biases (Llama) it is the bias; on a
base with biases (Qwen2's q/k/v) it is added to the base's own. `target_modules`, when given, must name exactly
the projections the tensors adapt.

Tables (per targeted module, created on first use):
  bias[module]  [slots + 1, layers, out]   row `slots` (tokens without BitFit) and untargeted layers zero
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.adapters.kinds.base import (
    AdapterFormatError,
    AdapterKind,
    AdapterLimits,
    BaseModelMismatch,
    ChunkView,
    SlotTables,
    Staging,
    token_slots,
)
from server.adapters.kinds.peft_keys import base_param_key, module_shape, module_tensors
from server.model.args import ModelArgs
from server.model.batch import StepAdapter

PEFT_TYPE = "BITFIT"


@dataclass(slots=True)
class BitFitWeights:
    biases: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> [out_features]

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(sorted({m for _, m in self.biases}))


class BitFitTables(SlotTables):
    def __init__(self, args: ModelArgs, num_slots: int, dtype: torch.dtype, device: str) -> None:
        self.args, self.num_slots, self.dtype, self.device = args, num_slots, dtype, device
        self.bias: dict[str, torch.Tensor] = {}

    @property
    def no_bitfit_row(self) -> int:
        return self.num_slots

    def _table(self, module: str) -> torch.Tensor:
        if module not in self.bias:
            _, n_out = self.args.projection_shape(module)
            self.bias[module] = torch.zeros(self.num_slots + 1, self.args.num_layers, n_out, dtype=self.dtype,
                                            device=self.device)
        return self.bias[module]

    def stage(self, payload: BitFitWeights, ready: Staging) -> BitFitWeights:
        return BitFitWeights({k: ready(t) for k, t in payload.biases.items()})

    def ensure(self, payload: BitFitWeights) -> None:
        for module in payload.target_modules:
            self._table(module)

    def fill(self, slot: int, payload: BitFitWeights) -> None:
        for (layer, module), vec in payload.biases.items():
            self._table(module)[slot, layer] = vec.to(self.dtype)

    def clear(self, slot: int) -> None:
        for table in self.bias.values():
            table[slot].zero_()


class BitFitStep(StepAdapter):
    """One gather-add per projection: y += bias[slot of the token, layer]."""

    def __init__(self, tables: BitFitTables, rows: torch.Tensor) -> None:
        self.tables = tables
        self.rows = rows  # [T] int64 table row of each token (no_bitfit_row = zeros)

    def project_output(self, x: torch.Tensor, y: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        table = self.tables.bias.get(module)
        return y if table is None else y + table[self.rows, layer]


class BitFitKind(AdapterKind):
    name = "BITFIT"
    peft_types = (PEFT_TYPE,)

    def read(self, cfg: dict, tensors: dict[str, torch.Tensor], args: ModelArgs,
             limits: AdapterLimits) -> BitFitWeights:
        biases: dict[tuple[int, str], torch.Tensor] = {}
        for (layer, module, _), t in module_tensors(tensors, args, ("bias",), base_param_key).items():
            _, n_out = args.projection_shape(module)
            if t.dim() != 1:
                raise AdapterFormatError(f"bias of layer {layer} {module} has shape {tuple(t.shape)}; "
                                         f"it must be a vector")
            if t.shape[0] != n_out:
                raise BaseModelMismatch(f"bias of layer {layer} {module} has {t.shape[0]} features; "
                                        f"the base has {n_out}")
            biases[(layer, module)] = t
        targets = cfg.get("target_modules")
        if targets is not None:
            named = {targets} if isinstance(targets, str) else set(targets) if isinstance(targets, list) else None
            if named is None or not all(isinstance(m, str) for m in named):
                raise AdapterFormatError(f"target_modules must be a list of projection names, got {targets!r}")
            present = {m for _, m in biases}
            if named != present:
                raise AdapterFormatError(f"target_modules {sorted(named)} do not match the tensors' modules "
                                         f"{sorted(present)}")
        return BitFitWeights(biases)

    def check_tensor_header(self, key: str, shape: tuple[int, ...], args: ModelArgs, limits: AdapterLimits) -> bool:
        """One bias vector, from the safetensors header alone: True when `key` is ours and fits the base."""
        parsed = base_param_key(key)
        if parsed is None:
            return False
        layer, module = parsed.layer, parsed.module
        _, n_out = module_shape(key, parsed, args)
        if len(shape) != 1:
            raise AdapterFormatError(f"bias of layer {layer} {module} has shape {shape}; it must be a vector")
        if shape[0] != n_out:
            raise BaseModelMismatch(f"bias of layer {layer} {module} has {shape[0]} features; the base has {n_out}")
        return True

    def tensors(self, payload: BitFitWeights) -> list[torch.Tensor]:
        return list(payload.biases.values())

    def describe(self, payload: BitFitWeights) -> dict:
        return {"rank": 0, "target_modules": list(payload.target_modules), "num_virtual_tokens": 0}

    def new_tables(self, args: ModelArgs, num_slots: int, limits: AdapterLimits, dtype: torch.dtype,
                   device: str) -> BitFitTables:
        return BitFitTables(args, num_slots, dtype, device)

    def step(self, tables: BitFitTables, chunks: list[ChunkView], num_tokens: int, device: torch.device) -> BitFitStep:
        return BitFitStep(tables, token_slots(chunks, num_tokens, tables.no_bitfit_row).to(device))
