"""Flatten a scheduled step into one ForwardBatch, run the model once, return per-sequence logits."""

from __future__ import annotations

import torch

from server.adapters.slots import AdapterTables
from server.adapters.weights import AdapterKind
from server.engine.batch import AdapterBatch, AttentionMeta, ForwardBatch
from server.engine.kv_cache import KVCache
from server.engine.sequence import Sequence
from server.model.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, tables: AdapterTables | None) -> None:
        self.model = model
        self.kv = kv
        self.tables = tables
        self.device = model.device

    def build(self, scheduled: list[tuple[Sequence, int]], prompt_embeds: dict[str, torch.Tensor]) -> tuple[
        ForwardBatch, list[Sequence]
    ]:
        """Batch metadata for `scheduled` [(seq, n_tokens)]; also the sequences sampled this step.

        prompt_embeds maps request_id -> [n_virtual, hidden] for prompt/P-tuning sequences.
        """
        ids: list[int] = []
        positions: list[int] = []
        write_slots: list[torch.Tensor] = []
        kv_rows: list[torch.Tensor] = []
        starts: list[int] = []
        lora_slots: list[int] = []
        ia3_rows: list[int] = []
        virtual_index: list[int] = []
        virtual_chunks: list[torch.Tensor] = []
        n_virtual_rows = 0
        logits_index: list[int] = []
        sampled: list[Sequence] = []
        no_ia3 = self.tables.no_ia3_row if self.tables is not None else 0
        for seq, n in scheduled:
            start = seq.num_computed
            flat_start = len(ids)
            ids.extend(seq.token_at(i) for i in range(start, start + n))
            positions.extend(range(start, start + n))
            write_slots.append(self.kv.slots(seq.blocks, start, start + n))
            kv_rows.append(self.kv.slots(seq.blocks, 0, start + n))
            starts.append(start)
            kind = seq.adapter_kind
            lora_slots.extend([_lora_slot(seq)] * n)
            ia3_rows.extend([seq.adapter_slot if kind == AdapterKind.IA3 else no_ia3] * n)
            v_lo, v_hi = seq.n_prefix, seq.n_prefix + seq.n_virtual
            offset = n_virtual_rows - v_lo
            row_of = [i + offset if v_lo <= i < v_hi else -1 for i in range(start, start + n)]
            if seq.n_virtual and any(r >= 0 for r in row_of):
                virtual_chunks.append(prompt_embeds[seq.request_id])
                n_virtual_rows += seq.n_virtual
            virtual_index.extend(row_of)
            if start + n == seq.context_len:
                logits_index.append(flat_start + n - 1)
                sampled.append(seq)
        dev = self.device
        attention = self._attention_meta(scheduled, starts, write_slots, kv_rows)
        adapters = None
        if self.tables is not None:
            lora_meta = None
            if any(s >= 0 for s in lora_slots):
                from kernels.meta import build_lora_meta

                slots = torch.tensor(lora_slots, dtype=torch.int32, device=dev)
                lora_meta = build_lora_meta(slots, self.tables.slot_ranks)
            adapters = AdapterBatch(
                lora_meta=lora_meta,
                ia3_rows=(torch.tensor(ia3_rows, device=dev) if any(r != no_ia3 for r in ia3_rows) else None),
                virtual_index=torch.tensor(virtual_index, device=dev) if virtual_chunks else None,
                virtual_embeds=torch.cat(virtual_chunks).to(dev) if virtual_chunks else None,
            )
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            attention=attention,
            logits_index=torch.tensor(logits_index, dtype=torch.int64, device=dev),
            adapters=adapters,
        )
        return batch, sampled

    def _attention_meta(
        self,
        scheduled: list[tuple[Sequence, int]],
        starts: list[int],
        write_slots: list[torch.Tensor],
        kv_rows: list[torch.Tensor],
    ) -> AttentionMeta:
        b = len(scheduled)
        q_lens = torch.tensor([n for _, n in scheduled])
        q_max = int(q_lens.max())
        kv_max = max(int(r.shape[0]) for r in kv_rows)
        kv_slots = torch.zeros(b, kv_max, dtype=torch.int64)
        for i, row in enumerate(kv_rows):
            kv_slots[i, : row.shape[0]] = row
        j = torch.arange(q_max)
        query_valid = j[None, :] < q_lens[:, None]  # [B, q_max]
        flat_starts = torch.cumsum(q_lens, 0) - q_lens
        query_index = torch.where(query_valid, flat_starts[:, None] + j[None, :], 0)
        q_pos = torch.where(query_valid, torch.tensor(starts)[:, None] + j[None, :], 0)  # [B, q_max]
        mask = torch.arange(kv_max)[None, None, :] <= q_pos[:, :, None]  # [B, q_max, kv_max]
        dev = self.device
        return AttentionMeta(
            kv_write_slots=torch.cat(write_slots).to(dev),
            query_index=query_index.to(dev),
            query_valid=query_valid.to(dev),
            kv_slots=kv_slots.to(dev),
            mask=mask[:, None].to(dev),
        )

    def run(self, scheduled: list[tuple[Sequence, int]], prompt_embeds: dict[str, torch.Tensor]) -> tuple[
        torch.Tensor, list[Sequence]
    ]:
        """Logits [S, vocab] fp32 for the sampled sequences (those whose context is now complete).

        Sequences are laid out grouped by LoRA slot (stable), so each adapter's tokens form one contiguous
        segment and the LoRA kernels work on slices; the returned `sampled` list follows that order.
        """
        scheduled = sorted(scheduled, key=lambda item: _lora_slot(item[0]))
        batch, sampled = self.build(scheduled, prompt_embeds)
        logits = self.model(batch, self.kv.k, self.kv.v)
        for seq, n in scheduled:
            seq.num_computed += n
        return logits, sampled


def _lora_slot(seq: Sequence) -> int:
    return seq.adapter_slot if seq.adapter_kind == AdapterKind.LORA else -1
