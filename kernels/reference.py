"""The LoRA shrink/expand semantics in plain torch: the test oracle and the CPU path.

Loops over segments (the distinct slots in the batch, usually few), never over tokens.
"""

from __future__ import annotations

import torch

from kernels.meta import LoraBatchMeta


def shrink_reference(
    x: torch.Tensor,  # [T, in]
    a_stack: torch.Tensor,  # [slots, rank, in] (may be a strided view of [slots, layers, rank, in])
    meta: LoraBatchMeta,
    out: torch.Tensor | None = None,  # [T, rank] fp32
) -> torch.Tensor:
    """Semantics: t[i] = x[i] @ A[slot[i]]^T in fp32 for slot[i] >= 0, else 0. Returns t [T, rank] fp32."""
    t = out if out is not None else torch.empty(x.shape[0], a_stack.shape[1], dtype=torch.float32, device=x.device)
    t.zero_()
    starts = meta.seg_starts_list
    for k, slot in enumerate(meta.seg_slots_list):
        if slot < 0:
            continue
        rows = meta.sorted_tokens[starts[k] : starts[k + 1]]
        t[rows] = x[rows].float() @ a_stack[slot].float().t()
    return t


def expand_reference(
    t: torch.Tensor,  # [T, rank] fp32
    b_stack: torch.Tensor,  # [slots, out, rank]
    scales: torch.Tensor,  # [slots] fp32
    meta: LoraBatchMeta,
    y: torch.Tensor,  # [T, out], updated in place
) -> torch.Tensor:
    """Semantics: y[i] += scale[slot[i]] * t[i] @ B[slot[i]]^T for slot[i] >= 0 (fp32 accumulate)."""
    starts = meta.seg_starts_list
    for k, slot in enumerate(meta.seg_slots_list):
        if slot < 0:
            continue
        rows = meta.sorted_tokens[starts[k] : starts[k + 1]]
        delta = (t[rows] @ b_stack[slot].float().t()) * scales[slot]
        y[rows] = (y[rows].float() + delta).to(y.dtype)
    return y
