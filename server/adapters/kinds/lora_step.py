"""The LoRA family's one StepAdapter per step: every LoRA, DoRA and LongLoRA token of the step under one
LoraBatchMeta, so a projection group (q/k/v, o, gate/up, down) takes one kernel call for all of them (on a
decode-sized CPU step the base matmuls join it: kernels.projection), with the family's per-slot extras
(lora_extras.py) on the rows of the slots that have them:
  DoRA      y = gain * (base + delta) (+ shift where the base has a bias): inside the one call where it can
            (fp32 gains, no shift), else a per-token multiply after it (finish)
  LongLoRA  the slot's embedding rows, RMSNorm weights and RoPE interpolation factor
  composed  a request weighting several LoRA adapters (chunks with `parts`): its (token, part) pairs take one
            more kernel call per projection group (kernels.compose), after the plain tokens' call
An extra no slot of the step uses costs nothing (decided once per step, on the host).
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import build_lora_meta
from kernels.compose import build_compose_meta, compose_apply
from kernels.pointwise import rms_normalize
from server.adapters.kinds.base import ChunkView, token_slots
from server.adapters.kinds.lora_extras import LongLoraSlots, norm_index
from server.adapters.kinds.lora_tables import LoraTables
from server.model.args import ModelArgs
from server.model.batch import StepAdapter


class LongLoraRows:
    """LongLoRA's three per-token lookups over its own sequences' rows: embedding rows, norm weights, RoPE factor."""

    def __init__(self, slots: LongLoraSlots, args: ModelArgs, chunks: list[ChunkView], num_tokens: int,
                 device: torch.device) -> None:
        self.slots, self.args, self.eps = slots, args, args.rms_norm_eps
        self.norm_rows = token_slots(chunks, num_tokens, slots.base_row).to(device)  # [T] norm table row
        self.mine = self.norm_rows != slots.base_row  # [T] bool: LongLoRA tokens
        self.all_mine = sum(c.count for c in chunks) == num_tokens
        embedded = [c for c in chunks if slots.has_embed[c.slot]]
        self.embed_tokens_at = None  # [n] flat tokens whose embedding row is the adapter's, and their slots
        if embedded:
            at = torch.cat([torch.arange(c.offset, c.offset + c.count) for c in embedded])
            of = torch.cat([torch.full((c.count,), c.slot, dtype=torch.int64) for c in embedded])
            self.embed_tokens_at = (at.to(device), of.to(device))
        self.factor = None  # [T] fp32, only when some sequence interpolates
        if any(slots.factor[c.slot] != 1.0 for c in chunks):
            factor = torch.ones(num_tokens, dtype=torch.float32)
            for c in chunks:
                factor[c.offset : c.offset + c.count] = slots.factor[c.slot]
            self.factor = factor.to(device)

    def embed_tokens(self, input_ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens_at is None:
            return h
        at, of = self.embed_tokens_at
        return h.index_copy(0, at, self.slots.embed[of, input_ids[at]].to(h.dtype))

    def rope_factor(self, factor: torch.Tensor | None) -> torch.Tensor | None:
        if self.factor is None:
            return factor
        return self.factor if factor is None else factor * self.factor

    def norm(self, x: torch.Tensor, y: torch.Tensor, layer: int, name: str, rows: torch.Tensor | None
             ) -> torch.Tensor:
        """The LongLoRA rows renormed with their slot's weight (RMSNorm's arithmetic); other rows as they came."""
        slot_rows = self.norm_rows if rows is None else self.norm_rows[rows]
        mine = self.mine if rows is None else self.mine[rows]
        # [n, hidden]; index_select copies rows (advanced indexing over the 3-d table took ~3x longer)
        weight = self.slots.norm[:, norm_index(self.args, layer, name)].index_select(0, slot_rows)
        h = rms_normalize(x, self.eps)
        if rows is None and self.all_mine:  # every token is LongLoRA's: no other row to keep
            return weight * h
        return torch.where(mine[:, None], weight * h, y)


class LoraStep(StepAdapter):
    """Shrink then expand through the segmented kernels, for every family token of the step at once: one fused
    kernel call per projection group on CPU (the kernel backend's lora_apply_group, or its fused_projection with the
    base)."""

    def __init__(self, tables: LoraTables, chunks: list[ChunkView], num_tokens: int, device: torch.device) -> None:
        self.tables = tables
        composed = [c for c in chunks if c.parts]
        chunks = [c for c in chunks if not c.parts]  # the plain single-adapter sequences
        # every (token, part) pair of the composed sequences, for one more call per group (None: no composition)
        self.compose = build_compose_meta([(i, slot, w) for c in composed for i in range(c.offset, c.offset + c.count)
                                           for slot, w in c.parts], tables.ranks, device)
        slots = token_slots(chunks, num_tokens, -1, torch.int32)
        self.meta = build_lora_meta(slots.to(device), tables.ranks)  # over the step's T tokens, slot -1 = none
        dora, long = tables.dora, tables.longlora
        self.gain_rows = None  # [T] int64 gain-table row of each token, only when a DoRA slot is in the step
        if any(dora.holds[c.slot] for c in chunks):
            self.gain_rows = token_slots(chunks, num_tokens, dora.neutral_row).to(device)
        long_chunks = [c for c in chunks if long.holds[c.slot]]
        self.long = LongLoraRows(long, tables.args, long_chunks, num_tokens, device) if long_chunks else None

    def embed_tokens(self, input_ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h if self.long is None else self.long.embed_tokens(input_ids, h)

    def rope_factor(self, factor: torch.Tensor | None) -> torch.Tensor | None:
        return factor if self.long is None else self.long.rope_factor(factor)

    def norm(self, x: torch.Tensor, y: torch.Tensor, layer: int, name: str, rows: torch.Tensor | None
             ) -> torch.Tensor:
        return y if self.long is None else self.long.norm(x, y, layer, name, rows)

    def project_output(self, x: torch.Tensor, y: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        return self.project_outputs(x, [y], layer, (module,))[0]

    def finish(self, y: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """y [T, out] = base + LoRA delta -> the projection's output: DoRA's gain (and shift) on its tokens."""
        if self.gain_rows is None:
            return y
        dora = self.tables.dora
        gain = dora.gain.get(module)
        if gain is None:
            return y
        # in place: y is this step's own output. index_select copies rows (advanced indexing took ~3x longer)
        y.mul_(gain[layer].index_select(0, self.gain_rows))
        shift = dora.shift.get(module)
        return y if shift is None else y.add_(shift[layer].index_select(0, self.gain_rows))

    def project_outputs(self, x: torch.Tensor, ys: list[torch.Tensor], layer: int, modules: tuple[str, ...]
                        ) -> list[torch.Tensor]:
        """The delta of every module of the group that has a table, in place on the base outputs, in one call."""
        present, group = self.tables.group(layer, modules)
        if group is None:
            return ys
        ys = list(ys)
        done = self.tables.kernels.lora_apply_group(x, group, self.tables.scale, self.meta, [ys[i] for i in present])
        if self.compose is not None:
            done = compose_apply(x, group, self.tables.scale, self.compose, done, self.tables.kernels)
        for i, y in zip(present, done, strict=True):
            ys[i] = self.finish(y, layer, modules[i])
        return ys

    def project_with_base(self, x: torch.Tensor, bases: list[nn.Module], layer: int, modules: tuple[str, ...]
                          ) -> list[torch.Tensor] | None:
        """The base matmuls and the family's deltas (DoRA's gains folded in) of a decode-sized CPU group in one
        compiled call (kernels.projection: the memory-bound LoRA reads beside the compute-bound tiles), when some
        module of the group has a table and every base layer has tiles; else None (the model runs base, then
        project_outputs)."""
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
        if self.compose is not None:  # composed tokens are outside the fused call (slot -1 there: no gain either)
            compose_apply(x, group, self.tables.scale, self.compose, [ys[i] for i in present], backend)
        if self.gain_rows is not None:
            for i in present:
                if gains is None or gains[i] is None:
                    ys[i] = self.finish(ys[i], layer, modules[i])
        return ys

    def fused_gains(self, layer: int, modules: tuple[str, ...]) -> list[torch.Tensor | None] | None:
        """Per module, this layer's gain rows [slots + 1, out] fp32 for the one compiled call to multiply in after
        the delta instead of finish() (kernels.projection's gains); None: finish() runs on every module (no DoRA
        slot in the step; or a shift, or bf16 gain tables)."""
        if self.gain_rows is None:
            return None
        dora = self.tables.dora
        if any(m in dora.shift for m in modules):
            return None
        gains = [dora.gain.get(m) for m in modules]
        if any(g is not None and g.dtype != torch.float32 for g in gains):
            return None
        return [None if g is None else g[layer] for g in gains]
