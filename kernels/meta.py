"""Per-batch LoRA metadata, built once per step and shared by every layer.

Tokens are stably sorted by adapter slot, counted, and cut into segments, so the batch need not
arrive sorted and the same metadata serves prefill chunks and single decode tokens alike.
"""

from __future__ import annotations

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
    has_lora: bool  # any slot >= 0; False = the LoRA kernels are skipped

    @property
    def num_tokens(self) -> int:
        return int(self.token_slots.shape[0])


def build_lora_meta(token_slots: torch.Tensor) -> LoraBatchMeta:
    """Segments of equal slot over the stably sorted tokens.

    >>> m = build_lora_meta(torch.tensor([2, -1, 2, 0]))
    >>> m.sorted_tokens.tolist(), m.seg_slots.tolist(), m.seg_starts.tolist()
    ([1, 3, 0, 2], [-1, 0, 2], [0, 1, 2, 4])
    """
    slots = token_slots.to(torch.int32)
    order = torch.sort(slots, stable=True).indices
    seg_slots, counts = torch.unique_consecutive(slots[order], return_counts=True)
    starts = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=slots.device)
    torch.cumsum(counts, 0, out=starts[1:])
    seg_slots_list = seg_slots.tolist()
    return LoraBatchMeta(
        token_slots=slots,
        sorted_tokens=order,
        seg_starts=starts,
        seg_slots=seg_slots.to(torch.int32),
        seg_slots_list=seg_slots_list,
        seg_starts_list=starts.tolist(),
        has_lora=any(s >= 0 for s in seg_slots_list),
    )
