"""IA3: learned scaling vectors. y = base(x * l_in[s]) on feed-forward modules (e.g. down_proj),
y = base(x) * l_out[s] on the others (k/v), as PEFT's IA3Model.

Tables (per targeted module, created on first use):
  scale_in[module]   [slots + 1, layers, in]    row `slots` is all ones (tokens without IA3)
  scale_out[module]  [slots + 1, layers, out]   row `slots` is all ones
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
from server.adapters.kinds.peft_keys import module_key, module_shape, module_tensors
from server.adapters.kinds.peft_options import check_served_options
from server.model.args import ModelArgs
from server.model.batch import StepAdapter


@dataclass(slots=True)
class IA3Weights:
    """Output scaling (k/v-style modules) or input scaling (feed-forward modules, e.g. down_proj)."""

    scales: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> [out_features] or [in_features]
    feedforward_modules: frozenset[str]  # modules whose *input* is scaled

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(sorted({m for _, m in self.scales}))


class IA3Tables(SlotTables):
    def __init__(self, args: ModelArgs, num_slots: int, dtype: torch.dtype, device: str) -> None:
        self.args, self.num_slots, self.dtype, self.device = args, num_slots, dtype, device
        self.scale_in: dict[str, torch.Tensor] = {}
        self.scale_out: dict[str, torch.Tensor] = {}

    @property
    def no_ia3_row(self) -> int:
        return self.num_slots

    def _table(self, module: str, feedforward: bool) -> torch.Tensor:
        tables = self.scale_in if feedforward else self.scale_out
        if module not in tables:
            n_in, n_out = self.args.projection_shape(module)
            shape = (self.num_slots + 1, self.args.num_layers, n_in if feedforward else n_out)
            tables[module] = torch.ones(shape, dtype=self.dtype, device=self.device)
        return tables[module]

    def stage(self, payload: IA3Weights, ready: Staging) -> IA3Weights:
        return IA3Weights({k: ready(t) for k, t in payload.scales.items()}, payload.feedforward_modules)

    def ensure(self, payload: IA3Weights) -> None:
        for module in payload.target_modules:
            self._table(module, module in payload.feedforward_modules)

    def fill(self, slot: int, payload: IA3Weights) -> None:
        for (layer, module), vec in payload.scales.items():
            table = self._table(module, module in payload.feedforward_modules)
            table[slot, layer] = vec.reshape(-1).to(self.dtype)

    def clear(self, slot: int) -> None:
        for table in (*self.scale_in.values(), *self.scale_out.values()):
            table[slot].fill_(1.0)


class IA3Step(StepAdapter):
    def __init__(self, tables: IA3Tables, rows: torch.Tensor) -> None:
        self.tables = tables
        self.rows = rows  # [T] int64 table row of each token (no_ia3_row = ones)

    def project_input(self, x: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        table = self.tables.scale_in.get(module)
        return x if table is None else x * table[self.rows, layer]

    def project_output(self, x: torch.Tensor, y: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        table = self.tables.scale_out.get(module)
        return y if table is None else y * table[self.rows, layer]


class IA3Kind(AdapterKind):
    name = "IA3"
    peft_types = ("IA3",)

    def check_config(self, cfg: dict) -> None:
        check_served_options(cfg)

    def read(self, cfg: dict, tensors: dict[str, torch.Tensor], args: ModelArgs, limits: AdapterLimits) -> IA3Weights:
        check_served_options(cfg)
        ff = cfg.get("feedforward_modules") or []
        ff_set = frozenset([ff] if isinstance(ff, str) else ff)
        scales: dict[tuple[int, str], torch.Tensor] = {}
        for (layer, module, _), t in module_tensors(tensors, args, ("ia3_l",)).items():
            n_in, n_out = args.projection_shape(module)
            is_ff = any(module == f or module.endswith(f) for f in ff_set)
            want = (1, n_in) if is_ff else (n_out, 1)
            if tuple(t.shape) != want:
                error = BaseModelMismatch if t.numel() != max(want) else AdapterFormatError
                raise error(f"ia3_l of layer {layer} {module} has shape {tuple(t.shape)}; the base needs {want}")
            scales[(layer, module)] = t.reshape(-1)
        modules = {m for _, m in scales}
        return IA3Weights(scales=scales, feedforward_modules=frozenset(m for m in modules if m in ff_set))

    def check_tensor_header(self, key: str, shape: tuple[int, ...], args: ModelArgs, limits: AdapterLimits) -> bool:
        """ia3_l [out, 1] or [1, in] (feed-forward) from the safetensors header alone."""
        parsed = module_key(key)
        if parsed is None or parsed.suffix != "ia3_l":
            return False
        n_in, n_out = module_shape(key, parsed, args)
        if shape not in ((n_out, 1), (1, n_in)):
            raise BaseModelMismatch(f"ia3_l of layer {parsed.layer} {parsed.module} has shape {shape}; the base needs "
                                    f"({n_out}, 1) or (1, {n_in})")
        return True

    def tensors(self, payload: IA3Weights) -> list[torch.Tensor]:
        return list(payload.scales.values())

    def describe(self, payload: IA3Weights) -> dict:
        return {"rank": 0, "target_modules": list(payload.target_modules), "num_virtual_tokens": 0}

    def new_tables(self, args: ModelArgs, num_slots: int, limits: AdapterLimits, dtype: torch.dtype,
                   device: str) -> IA3Tables:
        return IA3Tables(args, num_slots, dtype, device)

    def step(self, tables: IA3Tables, chunks: list[ChunkView], num_tokens: int, device: torch.device) -> IA3Step:
        return IA3Step(tables, token_slots(chunks, num_tokens, tables.no_ia3_row).to(device))
