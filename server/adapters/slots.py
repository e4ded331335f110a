"""Preallocated, slot-indexed adapter tables on the compute device.

Loading an adapter is a copy into a slot, never a reallocation, so tensor addresses stay fixed.
A module's table is created the first time any adapter targets that module.

  lora_a[module]  [slots, layers, max_rank, in]   zero-padded to max_rank
  lora_b[module]  [slots, layers, out, max_rank]
  lora_scale      [slots] fp32                     alpha/r (or alpha/sqrt(r)); 0 for non-LoRA slots
  slot_ranks      host list [slots]                each slot's true LoRA rank (0 = no LoRA), for the kernels
  ia3_in[module]  [slots + 1, layers, in]          input scaling; row `slots` is all ones (no IA3)
  ia3_out[module] [slots + 1, layers, out]         output scaling; row `slots` is all ones
"""

from __future__ import annotations

from dataclasses import replace

import torch

from server.adapters.weights import AdapterWeights, IA3Weights, LoraWeights
from server.model.args import ModelArgs


class AdapterTables:
    def __init__(self, args: ModelArgs, num_slots: int, max_rank: int, dtype: torch.dtype, device: str):
        self.args = args
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.lora_a: dict[str, torch.Tensor] = {}
        self.lora_b: dict[str, torch.Tensor] = {}
        self.lora_scale = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.slot_ranks: list[int] = [0] * num_slots
        self.ia3_in: dict[str, torch.Tensor] = {}
        self.ia3_out: dict[str, torch.Tensor] = {}

    @property
    def no_ia3_row(self) -> int:
        return self.num_slots

    def _lora_tables(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        if module not in self.lora_a:
            n_in, n_out = self.args.projection_shape(module)
            shape_a = (self.num_slots, self.args.num_layers, self.max_rank, n_in)
            shape_b = (self.num_slots, self.args.num_layers, n_out, self.max_rank)
            # B first: a projection that finds its module in lora_a (the step loop, while the pool's loader
            # thread adds a table) must find it in lora_b too
            self.lora_b[module] = torch.zeros(shape_b, dtype=self.dtype, device=self.device)
            self.lora_a[module] = torch.zeros(shape_a, dtype=self.dtype, device=self.device)
        return self.lora_a[module], self.lora_b[module]

    def ensure_tables(self, lora: LoraWeights | None, ia3: IA3Weights | None) -> None:
        """Create the module tables an adapter needs, so that copying it in adds no table (the pool calls
        this under its lock, then copies into a slot no sequence holds without the lock)."""
        for module in lora.target_modules if lora is not None else ():
            self._lora_tables(module)
        for module in sorted({m for _, m in ia3.scales}) if ia3 is not None else ():
            self._ia3_table(module, module in ia3.feedforward_modules)

    def _ia3_table(self, module: str, feedforward: bool) -> torch.Tensor:
        tables = self.ia3_in if feedforward else self.ia3_out
        if module not in tables:
            n_in, n_out = self.args.projection_shape(module)
            dim = n_in if feedforward else n_out
            shape = (self.num_slots + 1, self.args.num_layers, dim)
            tables[module] = torch.ones(shape, dtype=self.dtype, device=self.device)
        return tables[module]

    def staged(self, weights: AdapterWeights) -> AdapterWeights:
        """A host copy ready for a cheap copy into a slot: LoRA/IA3 tensors in the table dtype, contiguous,
        pinned when the tables live on CUDA. Prompt/prefix tensors are left as they are."""
        pin = str(self.device).startswith("cuda")

        def ready(t: torch.Tensor) -> torch.Tensor:
            t = t.to(self.dtype).contiguous()
            return t.pin_memory() if pin else t

        if weights.lora is not None:
            lora = weights.lora
            if lora.rank > self.max_rank:
                raise ValueError(f"LoRA rank {lora.rank} exceeds the configured maximum {self.max_rank}")
            weights = replace(weights, lora=replace(lora, a={k: ready(t) for k, t in lora.a.items()},
                                                    b={k: ready(t) for k, t in lora.b.items()}))
        if weights.ia3 is not None:
            scales = {k: ready(t) for k, t in weights.ia3.scales.items()}
            weights = replace(weights, ia3=replace(weights.ia3, scales=scales))
        return weights

    def clear(self, slot: int) -> None:
        for table in (*self.lora_a.values(), *self.lora_b.values()):
            table[slot].zero_()
        for table in (*self.ia3_in.values(), *self.ia3_out.values()):
            table[slot].fill_(1.0)
        self.lora_scale[slot] = 0.0
        self.slot_ranks[slot] = 0

    def load_lora(self, slot: int, lora: LoraWeights) -> None:
        """Copy a LoRA adapter into `slot` (rank <= max_rank, zero-padded)."""
        if lora.rank > self.max_rank:
            raise ValueError(f"LoRA rank {lora.rank} exceeds the configured maximum {self.max_rank}")
        self.clear(slot)
        for (layer, module), a in lora.a.items():
            table_a, table_b = self._lora_tables(module)
            table_a[slot, layer, : lora.rank] = a.to(self.dtype)
            table_b[slot, layer, :, : lora.rank] = lora.b[(layer, module)].to(self.dtype)
        self.lora_scale[slot] = lora.scale
        self.slot_ranks[slot] = lora.rank

    def load_ia3(self, slot: int, ia3: IA3Weights) -> None:
        self.clear(slot)
        for (layer, module), vec in ia3.scales.items():
            table = self._ia3_table(module, module in ia3.feedforward_modules)
            table[slot, layer] = vec.reshape(-1).to(self.dtype)

    def nbytes(self) -> int:
        tables = [*self.lora_a.values(), *self.lora_b.values(), *self.ia3_in.values(), *self.ia3_out.values()]
        return sum(t.numel() * t.element_size() for t in tables)
