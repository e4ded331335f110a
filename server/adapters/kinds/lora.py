"""LoRA: y += scale * (x @ A^T) @ B^T on each targeted projection (PEFT's LoraModel; rsLoRA scaling).

Tables (per targeted module, created on first use):
  a[module]  [slots, layers, max_rank, in]   zero-padded to max_rank
  b[module]  [slots, layers, max_rank, out]  rank-major: a rank-r adapter's B^T is r contiguous rows, so the
                                             kernels read r * out values, not max_rank * out (b_stack below)
  scale      [slots] fp32                     alpha/r (or alpha/sqrt(r)); 0 for an empty slot
  ranks      host list [slots]                each slot's true rank (0 = empty), so kernels skip the padding
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import kernels
from kernels import LoraBatchMeta, LoraGroup, SlotViews, build_lora_meta
from kernels.cpu import table_zeros
from server.adapters import validation
from server.adapters.kinds.base import (
    AdapterFormatError,
    AdapterKind,
    BaseModelMismatch,
    ChunkView,
    ReadLimits,
    SlotTables,
    Staging,
    token_slots,
)
from server.adapters.kinds.modules import check_served_options, module_tensors
from server.model.args import ModelArgs
from server.model.batch import StepAdapter


@dataclass(slots=True)
class LoraWeights:
    """y += scale * (x @ A^T) @ B^T on each (layer, module) present."""

    rank: int
    scale: float  # alpha / r, or alpha / sqrt(r) with use_rslora
    a: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> [rank, in_features]
    b: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> [out_features, rank]

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(sorted({m for _, m in self.a}))


class LoraTables(SlotTables):
    def __init__(self, args: ModelArgs, num_slots: int, max_rank: int, dtype: torch.dtype, device: str) -> None:
        self.args, self.num_slots, self.max_rank, self.dtype, self.device = args, num_slots, max_rank, dtype, device
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        self.scale = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.ranks: list[int] = [0] * num_slots
        self._views: dict[tuple[int, str], tuple[SlotViews, SlotViews]] = {}
        # (layer, modules) -> (generation, indices of the modules with a table, their kernel group)
        self._groups: dict[tuple[int, tuple[str, ...]], tuple[int, tuple[int, ...], LoraGroup | None]] = {}
        self._generation = 0  # bumped after a module's tables are added: groups made before are rebuilt
        self.kernels = kernels.backend(device)  # the tables' device's kernels

    def _module(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        if module not in self.a:
            n_in, n_out = self.args.projection_shape(module)
            layers = self.args.num_layers
            # B first: a step that finds the module in `a` (while the pool's loader adds a table) finds it in `b`
            self.b[module] = table_zeros(self.num_slots, layers, self.max_rank, n_out, dtype=self.dtype,
                                         device=self.device)
            self.a[module] = table_zeros(self.num_slots, layers, self.max_rank, n_in, dtype=self.dtype,
                                         device=self.device)
            self._generation += 1
        return self.a[module], self.b[module]

    def views(self, layer: int, module: str) -> tuple[SlotViews, SlotViews]:
        """Per-slot views of one layer's A [slots, max_rank, in] and B [slots, out, max_rank] (the kernels' layout;
        B a transposed view of the rank-major table), made once (tables are never reallocated)."""
        views = self._views.get((layer, module))
        if views is None:
            views = (SlotViews(self.a[module][:, layer], 1), SlotViews(self.b[module][:, layer].transpose(1, 2), 2))
            self._views[(layer, module)] = views
        return views

    def group(self, layer: int, modules: tuple[str, ...]) -> tuple[tuple[int, ...], LoraGroup | None]:
        """Which of a projection group's modules have tables (their indices in `modules`), and their A / B stacks
        as one kernels.LoraGroup (None when none has): made once per layer and group, remade after a table is
        added (the loader adds tables while steps run; a group made from the older set is never kept)."""
        generation = self._generation  # read first: a table added from here on invalidates what is built below
        entry = self._groups.get((layer, modules))
        if entry is not None and entry[0] == generation:
            return entry[1], entry[2]
        present = tuple(i for i, m in enumerate(modules) if m in self.a and m in self.b)
        views = [self.views(layer, modules[i]) for i in present]
        group = self.kernels.lora_group([a.stack for a, _ in views], [b.stack for _, b in views]) if present else None
        self._groups[(layer, modules)] = (generation, present, group)
        return present, group

    def stage(self, payload: LoraWeights, ready: Staging) -> LoraWeights:
        if payload.rank > self.max_rank:
            raise ValueError(f"LoRA rank {payload.rank} exceeds the configured maximum {self.max_rank}")
        return LoraWeights(payload.rank, payload.scale, {k: ready(t) for k, t in payload.a.items()},
                           {k: ready(t) for k, t in payload.b.items()})

    def ensure(self, payload: LoraWeights) -> None:
        for module in payload.target_modules:
            self._module(module)

    def fill(self, slot: int, payload: LoraWeights) -> None:
        if payload.rank > self.max_rank:
            raise ValueError(f"LoRA rank {payload.rank} exceeds the configured maximum {self.max_rank}")
        for (layer, module), a in payload.a.items():
            table_a, table_b = self._module(module)
            table_a[slot, layer, : payload.rank] = a.to(self.dtype)
            table_b[slot, layer, : payload.rank] = payload.b[(layer, module)].t().to(self.dtype)
        self.scale[slot] = payload.scale
        self.ranks[slot] = payload.rank

    def clear(self, slot: int) -> None:
        for table in (*self.a.values(), *self.b.values()):
            table[slot].zero_()
        self.scale[slot] = 0.0
        self.ranks[slot] = 0


class LoraStep(StepAdapter):
    """Shrink then expand through the segmented kernels, for every LoRA token of the step at once: one fused
    kernel call per projection group (q/k/v, o, gate/up, down) on CPU (the kernel backend's lora_apply_group)."""

    def __init__(self, tables: LoraTables, meta: LoraBatchMeta) -> None:
        self.tables = tables
        self.meta = meta  # over the step's T tokens, slot -1 = no LoRA

    def project_output(self, x: torch.Tensor, y: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        return self.project_outputs(x, [y], layer, (module,))[0]

    def finish(self, y: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """y [T, out] = base + LoRA delta -> the projection's output; kinds built on LoRA (DoRA) override this."""
        return y

    def project_outputs(self, x: torch.Tensor, ys: list[torch.Tensor], layer: int, modules: tuple[str, ...]
                        ) -> list[torch.Tensor]:
        """The delta of every module of the group that has a table, in place on the base outputs, in one call."""
        present, group = self.tables.group(layer, modules)
        if group is None:
            return ys
        ys = list(ys)
        done = self.tables.kernels.lora_apply_group(x, group, self.tables.scale, self.meta, [ys[i] for i in present])
        for i, y in zip(present, done, strict=True):
            ys[i] = self.finish(y, layer, modules[i])
        return ys

    def project_with_base(self, x: torch.Tensor, bases: list[torch.nn.Module], layer: int, modules: tuple[str, ...]
                          ) -> list[torch.Tensor] | None:
        """The base matmuls and the LoRA deltas of a decode-sized CPU group in one compiled call
        (kernels.projection: the memory-bound LoRA reads beside the compute-bound tiles), when some module of the
        group has a table and every base layer has tiles; else None (the model runs base, then project_outputs)."""
        backend = self.tables.kernels
        if not self.meta.has_lora or not backend.fuses(x):
            return None
        present, group = self.tables.group(layer, modules)
        if group is None:
            return None
        specs = [getattr(base, "tile_spec", lambda: None)() for base in bases]
        if None in specs:
            return None
        gains = self.fused_gains(layer, modules)
        ys = backend.fused_projection(x, specs, group, present, self.tables.scale, self.meta, gains)
        if ys is None:
            return None
        for i in present:
            if gains is None or gains[i] is None:
                ys[i] = self.finish(ys[i], layer, modules[i])
        return ys

    def fused_gains(self, layer: int, modules: tuple[str, ...]) -> list[torch.Tensor | None] | None:
        """Per module, a gain table [>= slots, out] fp32 the one call multiplies in after the delta instead of
        finish() (kernels.projection's gains); None: finish() runs on every module. DoRA overrides it."""
        return None


class LoraKind(AdapterKind):
    name = "LORA"
    peft_types = ("LORA",)

    def accepts(self, cfg: dict) -> bool:
        return cfg.get("peft_type") == "LORA" and not cfg.get("use_dora")  # use_dora: server/adapters/kinds/dora.py

    def check_config(self, cfg: dict) -> None:
        check_served_options(cfg)

    def read(self, cfg: dict, tensors: dict[str, torch.Tensor], args: ModelArgs, limits: ReadLimits) -> LoraWeights:
        check_served_options(cfg)
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        if not isinstance(r, int) or r < 1:
            raise AdapterFormatError(f"LoRA rank r must be a positive integer, got {r!r}")
        if r > limits.max_lora_rank:
            raise AdapterFormatError(f"LoRA rank {r} exceeds the server's maximum rank {limits.max_lora_rank}")
        alpha = validation.check_scale("lora_alpha", alpha)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        validation.check_scale("the LoRA scale lora_alpha/r", scale)
        a: dict[tuple[int, str], torch.Tensor] = {}
        b: dict[tuple[int, str], torch.Tensor] = {}
        for (layer, module, suffix), t in module_tensors(tensors, args, ("lora_A", "lora_B")).items():
            n_in, n_out = args.projection_shape(module)
            want = (r, n_in) if suffix == "lora_A" else (n_out, r)
            if tuple(t.shape) != want:
                rank_ok = t.dim() == 2 and t.shape[0 if suffix == "lora_A" else 1] == r
                error = BaseModelMismatch if rank_ok else AdapterFormatError
                raise error(f"{suffix} of layer {layer} {module} has shape {tuple(t.shape)}; the base needs {want}")
            (a if suffix == "lora_A" else b)[(layer, module)] = t
        if a.keys() != b.keys():
            raise AdapterFormatError("every lora_A needs its lora_B (and vice versa)")
        return LoraWeights(rank=r, scale=float(scale), a=a, b=b)

    def tensors(self, payload: LoraWeights) -> list[torch.Tensor]:
        return [*payload.a.values(), *payload.b.values()]

    def describe(self, payload: LoraWeights) -> dict:
        return {"rank": payload.rank, "target_modules": list(payload.target_modules), "num_virtual_tokens": 0}

    def new_tables(self, args: ModelArgs, num_slots: int, limits: ReadLimits, dtype: torch.dtype,
                   device: str) -> LoraTables:
        return LoraTables(args, num_slots, limits.max_lora_rank, limits.lora_dtype or dtype, device)

    def step(self, tables: LoraTables, chunks: list[ChunkView], num_tokens: int, device: torch.device) -> LoraStep:
        slots = token_slots(chunks, num_tokens, -1, torch.int32)
        return LoraStep(tables, build_lora_meta(slots.to(device), tables.ranks))
