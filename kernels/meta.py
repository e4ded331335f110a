"""Per-batch LoRA metadata, built once per step and shared by every layer.

Tokens are stably sorted by adapter slot, counted, and cut into segments, so the batch need not
arrive sorted and the same metadata serves prefill chunks and single decode tokens alike. When the
batch does arrive grouped by slot (the engine's runner lays it out that way), `contiguous` is True
and every segment is a plain slice of the token axis, which the CPU path exploits (no gathers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class LoraBatchMeta:
    token_slots: torch.Tensor  # [T] int32 adapter slot of each token, -1 = no LoRA
    sorted_tokens: torch.Tensor  # [T] int64 token indices, stably sorted by slot
    seg_starts: torch.Tensor  # [S + 1] int64 segment boundaries into sorted_tokens
    seg_slots: torch.Tensor  # [S] int32 slot of each segment (may be -1)
    seg_slots_list: list[int]  # the same, on the host (segment loops need no device sync)
    seg_starts_list: list[int]
    seg_ranks_list: list[int] | None  # true rank of each segment's adapter (<= the tables' padded rank); None = padded
    contiguous: bool  # sorted_tokens is the identity: segment k is tokens seg_starts[k]:seg_starts[k+1]
    has_lora: bool  # any slot >= 0; False = the LoRA kernels are skipped
    # [S', 4] int64 host: (lo, hi, slot, rank or -1) of each segment with a LoRA, the table the compiled CPU kernels
    # walk (made once per step here, shared by every layer's calls; None for a batch on CUDA)
    segment_table: torch.Tensor | None = None

    def lora_segments(self) -> list[tuple[int, int, int, int | None]]:
        """(start, end, slot, rank) of each segment that has a LoRA, in sorted-token coordinates."""
        starts, ranks = self.seg_starts_list, self.seg_ranks_list
        return [
            (starts[k], starts[k + 1], slot, None if ranks is None else ranks[k])
            for k, slot in enumerate(self.seg_slots_list)
            if slot >= 0
        ]


def build_lora_meta(token_slots: torch.Tensor, slot_ranks: Sequence[int] | None = None) -> LoraBatchMeta:
    """Segments of equal slot over the stably sorted tokens.

    slot_ranks: the true LoRA rank of each slot (host list indexed by slot), so kernels can skip the
    zero padding of lower-rank adapters; None = use the tables' full (padded) rank.

    >>> m = build_lora_meta(torch.tensor([2, -1, 2, 0]))
    >>> m.sorted_tokens.tolist(), m.seg_slots.tolist(), m.seg_starts.tolist(), m.contiguous
    ([1, 3, 0, 2], [-1, 0, 2], [0, 1, 2, 4], False)
    """
    slots = token_slots.to(torch.int32)
    order = torch.sort(slots, stable=True).indices
    seg_slots, counts = torch.unique_consecutive(slots[order], return_counts=True)
    starts = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=slots.device)
    torch.cumsum(counts, 0, out=starts[1:])
    seg_slots_list = seg_slots.tolist()
    ranks = None if slot_ranks is None else [slot_ranks[s] if s >= 0 else 0 for s in seg_slots_list]
    meta = LoraBatchMeta(
        token_slots=slots,
        sorted_tokens=order,
        seg_starts=starts,
        seg_slots=seg_slots.to(torch.int32),
        seg_slots_list=seg_slots_list,
        seg_starts_list=starts.tolist(),
        seg_ranks_list=ranks,
        contiguous=bool(torch.equal(order, torch.arange(order.numel(), device=order.device))),
        has_lora=any(s >= 0 for s in seg_slots_list),
    )
    if not slots.is_cuda:
        rows = [(lo, hi, slot, -1 if rank is None else rank) for lo, hi, slot, rank in meta.lora_segments()]
        meta.segment_table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)
    return meta
