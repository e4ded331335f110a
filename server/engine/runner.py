"""Flatten a scheduled step into one ForwardBatch, run the model once, return per-sequence logits.

build() in three named steps: lay the tokens out flat (`_lay_out`), describe attention over the paged
KV cache (`_attention_meta`), and let each adapter kind present build its StepAdapter (`_step_adapters`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.attention import build_paged_attention_meta
from server.adapters import kinds
from server.adapters.kinds import ChunkView, ContextLayout
from server.adapters.slots import AdapterTables
from server.engine.kv_cache import KVCache
from server.engine.sequence import Sequence
from server.model.batch import AttentionMeta, ForwardBatch, StepAdapter
from server.model.llama import LlamaModel


@dataclass(slots=True)
class StepLayout:
    """The step's tokens laid out sequence after sequence (T tokens, B sequences, S of them sampled)."""

    input_ids: list[int] = field(default_factory=list)  # [T]
    positions: list[int] = field(default_factory=list)  # [T] context index = RoPE position
    starts: list[int] = field(default_factory=list)  # [B] first context index computed this step
    write_slots: list[torch.Tensor] = field(default_factory=list)  # B x [n] KV slots the new tokens fill
    logits_index: list[int] = field(default_factory=list)  # [S] flat token whose logits are sampled
    sampled: list[Sequence] = field(default_factory=list)  # [S]
    chunks: dict[str, list[ChunkView]] = field(default_factory=dict)  # kind family -> its sequences' chunks


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, tables: AdapterTables) -> None:
        self.model = model
        self.kv = kv
        self.tables = tables
        self.device = model.device
        tables.bind_base(model.base_weight)  # slot tables derived from the base (e.g. weight norms) read it at fill

    def run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """Logits [S, vocab] fp32 for the sampled sequences (those whose context is now complete).

        Sequences are laid out grouped by adapter slot (stable), so each adapter's tokens form one contiguous
        segment and the LoRA kernels work on slices; the returned `sampled` list follows that order.
        """
        scheduled = sorted(scheduled, key=lambda item: item[0].adapter_slot)
        batch, sampled = self.build(scheduled)
        logits = self.model(batch, self.kv.k, self.kv.v)
        for seq, n in scheduled:
            seq.num_computed += n
        return logits, sampled

    def build(self, scheduled: list[tuple[Sequence, int]]) -> tuple[ForwardBatch, list[Sequence]]:
        """Batch metadata for `scheduled` [(seq, n_tokens)]; also the sequences sampled this step."""
        layout = self._lay_out(scheduled)
        dev = self.device
        batch = ForwardBatch(
            input_ids=torch.tensor(layout.input_ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(layout.positions, dtype=torch.int64, device=dev),
            attention=self._attention_meta(scheduled, layout),
            logits_index=torch.tensor(layout.logits_index, dtype=torch.int64, device=dev),
            adapters=self._step_adapters(layout.chunks, len(layout.input_ids)),
        )
        return batch, layout.sampled

    def _lay_out(self, scheduled: list[tuple[Sequence, int]]) -> StepLayout:
        out = StepLayout()
        for seq, n in scheduled:
            start, offset = seq.num_computed, len(out.input_ids)
            out.input_ids.extend(seq.token_at(i) for i in range(start, start + n))
            out.positions.extend(range(start, start + n))
            out.starts.append(start)
            out.write_slots.append(self.kv.kv_slots(seq.blocks, start, start + n))
            if start + n == seq.context_len:
                out.logits_index.append(offset + n - 1)
                out.sampled.append(seq)
            lease = seq.lease
            if lease is not None:
                chunk = ChunkView(lease.adapter_slot, lease.weights.payload, start, n, offset,
                                  ContextLayout(seq.n_prefix, seq.n_virtual))
                out.chunks.setdefault(kinds.family_of(lease.weights.kind), []).append(chunk)
            elif seq.part_leases:  # a composition: LoRA parts only (server/engine/composition.py)
                parts = tuple((part.adapter_slot, weight) for part, weight in seq.part_leases)
                chunk = ChunkView(-1, None, start, n, offset, ContextLayout(), parts)
                family = kinds.family_of(seq.part_leases[0][0].weights.kind)
                out.chunks.setdefault(family, []).append(chunk)
        return out

    def _step_adapters(self, chunks: dict[str, list[ChunkView]], num_tokens: int) -> list[StepAdapter]:
        """One StepAdapter per kind family present, asked of its first registered kind (registration order = the
        order hooks run in a projection), over the chunks of every kind of the family."""
        adapters, done = [], set()
        for kind in kinds.registered():
            family = kind.family_name
            if family in chunks and family not in done:
                done.add(family)
                step = kind.step(self.tables.by_kind.get(kind.name), chunks[family], num_tokens, self.device)
                if step is not None:
                    adapters.append(step)
        return adapters

    def _attention_meta(self, scheduled: list[tuple[Sequence, int]], layout: StepLayout) -> AttentionMeta:
        """Once per step, shared by every layer: where the new K/V go, and each sequence's block table."""
        q_lens = [n for _, n in scheduled]
        context_lens = [start + n for start, n in zip(layout.starts, q_lens, strict=True)]
        width = max(len(seq.blocks) for seq, _ in scheduled)
        tables = [seq.blocks + [-1] * (width - len(seq.blocks)) for seq, _ in scheduled]
        return AttentionMeta(
            kv_write_slots=torch.cat(layout.write_slots).to(self.device),
            paged=build_paged_attention_meta(q_lens, context_lens, tables, self.kv.block_size),
        )
