"""Composed adapters: a token that takes part in several LoRA slots, each with its own weight, in one extra call.

A request may weight several LoRA adapters (its "parts"); each of its tokens then needs
y[i] += sum_p w_p * scale[slot_p] * (x[i] @ A[slot_p]^T) @ B[slot_p]^T. The segmented kernels write y in parallel
over (segment, token block) items, so one token must not appear twice in one call; and their scale is per slot,
while two requests may weight the same slot differently. Both are solved by the pairs: every (token, part) is a
row of its own (x gathered and multiplied by the part's weight: the delta is linear in x), the rows are sorted by
slot (each adapter's A / B read once per call however many tokens use it), one ordinary lora_apply_group call
computes every pair's delta into its own row, and the rows are added back to their tokens (index_add_: a token's
parts are summed there, not raced). The cost is the parts' bytes, one call per projection group whatever the
number of parts; the plain single-adapter tokens of the step keep their own call (and the fused base + LoRA call).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels.backend import KernelBackend, LoraGroup
from kernels.meta import LoraBatchMeta, build_lora_meta


@dataclass(slots=True)
class ComposeMeta:
    """The step's (token, part) pairs, sorted by slot (stable); built once per step, read by every layer."""

    rows: torch.Tensor  # [P] int64 the flat token of each pair
    weights: torch.Tensor  # [P, 1] fp32 each pair's weight
    meta: LoraBatchMeta  # over the P pairs (contiguous: pairs are sorted by slot)


def build_compose_meta(pairs: Sequence[tuple[int, int, float]], slot_ranks: Sequence[int] | None,
                       device: torch.device | str = "cpu") -> ComposeMeta | None:
    """pairs: (flat token, slot, weight) of every part of every composed token; None when there is none.

    >>> m = build_compose_meta([(0, 3, 0.5), (0, 1, 2.0), (1, 3, -1.0)], None)
    >>> m.rows.tolist(), m.weights.flatten().tolist(), m.meta.seg_slots_list, m.meta.contiguous
    ([0, 0, 1], [2.0, 0.5, -1.0], [1, 3], True)
    """
    if not pairs:
        return None
    ordered = sorted(pairs, key=lambda p: p[1])  # stable: a slot's pairs stay in token order
    rows = torch.tensor([p[0] for p in ordered], dtype=torch.int64)
    weights = torch.tensor([[p[2]] for p in ordered], dtype=torch.float32)
    slots = torch.tensor([p[1] for p in ordered], dtype=torch.int32)
    return ComposeMeta(rows.to(device), weights.to(device), build_lora_meta(slots.to(device), slot_ranks))


def compose_apply(x: torch.Tensor, group: LoraGroup, scales: torch.Tensor, compose: ComposeMeta,
                  ys: list[torch.Tensor], kernels: KernelBackend) -> list[torch.Tensor]:
    """Semantics: for every pair p = (i, slot, w) and every stack s of the group, ys[s][i] += w * scale[slot] *
    (x[i] @ A_s[slot, :r]^T) @ B_s[slot, :, :r]^T, each pair's delta summed in fp32 (lora_apply_group's math on
    x[i] * w), then the pairs added to their tokens in y's dtype. x [T, in]; ys[s] [T, out_s] updated in place
    (returned); scales [slots] fp32; `kernels` the device's backend (its lora_apply_group). Other rows untouched."""
    if not ys:
        return ys
    xs = x.index_select(0, compose.rows).float().mul_(compose.weights).to(x.dtype)  # [P, in]
    deltas = [torch.zeros(compose.rows.shape[0], y.shape[1], dtype=torch.float32, device=y.device) for y in ys]
    kernels.lora_apply_group(xs, group, scales, compose.meta, deltas)
    for y, delta in zip(ys, deltas, strict=True):
        y.index_add_(0, compose.rows, delta.to(y.dtype))
    return ys


def compose_reference(x: torch.Tensor, a_stacks: Sequence[torch.Tensor], b_stacks: Sequence[torch.Tensor],
                      scales: torch.Tensor, pairs: Sequence[tuple[int, int, float]], ys: list[torch.Tensor],
                      ranks: Sequence[int] | None = None) -> list[torch.Tensor]:
    """The oracle of compose_apply, one pair at a time in plain fp32 torch: ys[s][i] += w * scale[slot] *
    (x[i] @ A_s[slot, :r]^T) @ B_s[slot, :, :r]^T (r = ranks[slot], or the padded rank). Returns new tensors."""
    out = [y.float().clone() for y in ys]
    for i, slot, w in pairs:
        for s, (a, b) in enumerate(zip(a_stacks, b_stacks, strict=True)):
            r = a.shape[1] if ranks is None else ranks[slot]
            t = x[i].float() @ a[slot, :r].float().t()  # [r]
            out[s][i] += w * float(scales[slot]) * (t @ b[slot, :, :r].float().t())
    return [o.to(y.dtype) for o, y in zip(out, ys, strict=True)]
