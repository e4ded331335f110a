"""The LoRA family's one slot table set: LoRA, DoRA and LongLoRA adapters fill the same A / B tables (as vLLM's
punica wrapper serves every LoRA variant from one stack), with DoRA's gains and LongLoRA's norms / embeddings /
RoPE factor as optional per-slot extras (lora_extras.py). One step's sequences of all three kinds then share one
LoraBatchMeta and one kernel call per projection group (lora_step.py).

Tables (per targeted module, created on first use):
  a[module]  [slots, layers, max_rank, in]   zero-padded to max_rank
  b[module]  [slots, layers, max_rank, out]  rank-major: a rank-r adapter's B^T is r contiguous rows, so the
                                             kernels read r * out values, not max_rank * out
  scale      [slots] fp32                     alpha/r (or alpha/sqrt(r)); 0 for an empty slot
  ranks      host list [slots]                each slot's true rank (0 = empty), so kernels skip the padding
A / B are kept in `dtype` (the pool's lora_dtype, else the model's); the extras in the model's `extra_dtype`.
"""

from __future__ import annotations

import torch

import kernels
from kernels import LoraGroup, SlotViews
from kernels.cpu import table_zeros
from server.adapters.kinds.base import SlotTables, Staging
from server.adapters.kinds.lora_extras import DoraGains, LongLoraSlots
from server.adapters.kinds.lora_weights import DoraWeights, FamilyWeights, LongLoraWeights, LoraWeights, lora_part
from server.model.args import ModelArgs


class LoraTables(SlotTables):
    def __init__(self, args: ModelArgs, num_slots: int, max_rank: int, dtype: torch.dtype, device: str,
                 extra_dtype: torch.dtype | None = None) -> None:
        self.args, self.num_slots, self.max_rank, self.dtype, self.device = args, num_slots, max_rank, dtype, device
        self.extra_dtype = extra_dtype or dtype
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        self.scale = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.ranks: list[int] = [0] * num_slots
        self.dora = DoraGains(args, num_slots, self.extra_dtype, device)
        self.longlora = LongLoraSlots(args, num_slots, self.extra_dtype, device)
        self._views: dict[tuple[int, str], tuple[SlotViews, SlotViews]] = {}
        # (layer, modules) -> (generation, indices of the modules with a table, their kernel group)
        self._groups: dict[tuple[int, tuple[str, ...]], tuple[int, tuple[int, ...], LoraGroup | None]] = {}
        self.kernels = kernels.backend(device)  # the tables' device's kernels
        self._generation = 0  # bumped after a module's tables are added: groups made before are rebuilt

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

    def _check_rank(self, lora: LoraWeights) -> None:
        if lora.rank > self.max_rank:
            raise ValueError(f"LoRA rank {lora.rank} exceeds the configured maximum {self.max_rank}")

    def stage(self, payload: FamilyWeights, ready: Staging) -> FamilyWeights:
        lora = lora_part(payload)
        self._check_rank(lora)
        staged = LoraWeights(lora.rank, lora.scale, {k: ready(t) for k, t in lora.a.items()},
                             {k: ready(t) for k, t in lora.b.items()})
        extra = self.extra_dtype
        if isinstance(payload, DoraWeights):
            return DoraWeights(staged, {k: ready(t, extra) for k, t in payload.magnitude.items()})
        if isinstance(payload, LongLoraWeights):
            embed = None if payload.embed is None else ready(payload.embed, extra)
            return LongLoraWeights(staged, {k: ready(t, extra) for k, t in payload.norms.items()}, embed,
                                   payload.factor)
        return staged

    def ensure(self, payload: FamilyWeights) -> None:
        for module in lora_part(payload).target_modules:
            self._module(module)
        if isinstance(payload, DoraWeights):
            self.dora.ensure(payload, self.base)
        elif isinstance(payload, LongLoraWeights):
            self.longlora.ensure(payload, self.bound_base("LongLoRA (its norm weights)"))

    def fill(self, slot: int, payload: FamilyWeights) -> None:
        lora = lora_part(payload)
        self._check_rank(lora)
        gains = None  # everything that can fail, before the first copy
        if isinstance(payload, DoraWeights):
            gains = self.dora.gains(payload, self.bound_base("DoRA"))
        elif isinstance(payload, LongLoraWeights):
            self.longlora.ensure(payload, self.bound_base("LongLoRA (its norm weights)"))
        for (layer, module), a in lora.a.items():
            table_a, table_b = self._module(module)
            table_a[slot, layer, : lora.rank] = a.to(self.dtype)
            table_b[slot, layer, : lora.rank] = lora.b[(layer, module)].t().to(self.dtype)
        self.scale[slot] = lora.scale
        self.ranks[slot] = lora.rank
        if gains is not None:
            self.dora.fill(slot, gains, self.base)
        elif isinstance(payload, LongLoraWeights):
            self.longlora.fill(slot, payload, self.base)

    def clear(self, slot: int) -> None:
        for table in (*self.a.values(), *self.b.values()):
            table[slot].zero_()
        self.scale[slot] = 0.0
        self.ranks[slot] = 0
        self.dora.clear(slot)
        self.longlora.clear(slot)
