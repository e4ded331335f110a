"""Preallocated, slot-indexed adapter tables on the compute device: one `SlotTables` per registered kind family
that keeps something on the device (server/adapters/kinds/; LoRA, DoRA and LongLoRA share one).

Loading an adapter is a copy into a slot, never a reallocation, so tensor addresses stay fixed. A slot
holds one adapter of one kind; clearing it resets every kind's tables for that slot.
"""

from __future__ import annotations

import torch

from server.adapters import kinds
from server.adapters.kinds import AdapterLimits, SlotTables
from server.adapters.kinds.base import BaseWeights
from server.adapters.weights import AdapterWeights
from server.model.args import ModelArgs


class AdapterTables:
    def __init__(self, args: ModelArgs, num_slots: int, limits: AdapterLimits, dtype: torch.dtype, device: str):
        self.num_slots = num_slots
        self.dtype = dtype
        self.device = device
        self.by_kind: dict[str, SlotTables] = {}  # kind name -> its family's tables (kinds with device state only)
        self.by_family: dict[str, SlotTables] = {}  # family -> its tables, made by its first registered kind
        for kind in kinds.registered():
            family = kind.family_name
            if family not in self.by_family:
                tables = kind.new_tables(args, num_slots, limits, dtype, device)
                if tables is None:
                    continue
                self.by_family[family] = tables
            self.by_kind[kind.name] = self.by_family[family]

    def bind_base(self, base: BaseWeights) -> None:
        """Give every kind's tables the served model's base weights (the runner calls this once, before any fill)."""
        for tables in self.by_family.values():
            tables.bind_base(base)

    def ensure(self, weights: AdapterWeights) -> None:
        """Create the tables `weights` needs, so that filling its slot adds none (the pool calls this under its
        lock, then fills a slot no sequence holds without the lock)."""
        tables = self.by_kind.get(weights.kind)
        if tables is not None:
            tables.ensure(weights.payload)

    def staged(self, weights: AdapterWeights) -> AdapterWeights:
        """A host copy ready for a cheap copy into a slot: tensors in the table dtype, contiguous, pinned when
        the tables live on CUDA (kinds without device tables keep theirs as they are)."""
        tables = self.by_kind.get(weights.kind)
        if tables is None:
            return weights
        pin = str(self.device).startswith("cuda")

        table_dtype = getattr(tables, "dtype", self.dtype)  # a kind's tables may keep their own (lora_dtype)

        def ready(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
            t = t.to(dtype or table_dtype).contiguous()
            return t.pin_memory() if pin else t

        staged = tables.stage(weights.payload, ready)
        return AdapterWeights(weights.kind, weights.config, staged, weights.base_model, weights.meta)

    def fill(self, slot: int, weights: AdapterWeights) -> None:
        self.clear(slot)
        tables = self.by_kind.get(weights.kind)
        if tables is not None:
            tables.fill(slot, weights.payload)

    def clear(self, slot: int) -> None:
        for tables in self.by_family.values():
            tables.clear(slot)
