"""The LoRA shrink/expand semantics in plain torch: the test oracle and the CPU path.

Loops over segments (the distinct slots in the batch), never over tokens. When the batch arrives
grouped by slot (`meta.contiguous`), each segment is a slice of the token axis and is multiplied in
place through views (no gather/scatter copies: what makes a decode step with many distinct adapters
cheap on CPU); otherwise segments are gathered through `sorted_tokens`. Only each adapter's true rank
is multiplied (`meta.seg_ranks_list`), not the tables' zero padding.
"""

from __future__ import annotations

import torch

from kernels.meta import LoraBatchMeta


class SlotViews:
    """Views of one stacked table per (slot, rank): `stack[slot]` cut to the adapter's true rank.

    Made once and reused every step: a CPU decode step over many adapters would otherwise spend much of
    its LoRA time creating these views (select + slice, thousands per step). The pool's tables are
    preallocated and never reallocated (loading copies into a slot), so a view stays valid for the
    table's life and reads whatever the slot holds when it is used.
    """

    def __init__(self, stack: torch.Tensor, rank_dim: int) -> None:
        self.stack = stack  # [slots, rank, in] (A) or [slots, out, rank] (B); rank_dim is 1 or 2
        self.rank_dim = rank_dim
        self._views: dict[tuple[int, int | None], torch.Tensor] = {}

    def __call__(self, slot: int, rank: int | None) -> torch.Tensor:
        view = self._views.get((slot, rank))
        if view is None:
            view = self.stack[slot]
            if rank is not None:
                view = view.narrow(self.rank_dim - 1, 0, rank)
            self._views[(slot, rank)] = view
        return view


def shrink_reference(
    x: torch.Tensor,  # [T, in]
    a_stack: torch.Tensor,  # [slots, rank, in] (may be a strided view of [slots, layers, rank, in])
    meta: LoraBatchMeta,
    a_views: SlotViews | None = None,  # cached views of a_stack (same values; saves view creation)
) -> torch.Tensor:
    """Semantics: t[i] = x[i] @ A[slot[i]]^T in fp32 for slot[i] >= 0, else 0. Returns t [T, rank] fp32."""
    t = torch.zeros(x.shape[0], a_stack.shape[1], dtype=torch.float32, device=x.device)
    views = a_views or SlotViews(a_stack, rank_dim=1)
    segments = meta.lora_segments()
    if meta.contiguous:
        x32 = x.float()
        x_rows, t_rows = _decode_rows(segments, x32, t)
    for lo, hi, slot, rank in segments:
        a = views(slot, rank).float()  # [r, in]
        if meta.contiguous and hi - lo == 1:  # a decode token: matrix-vector, the fewest ops
            torch.mv(a, x_rows[lo], out=t_rows[lo] if t_rows is not None else t[lo, : a.shape[0]])
        elif meta.contiguous:
            t[lo:hi, : a.shape[0]] = x32[lo:hi] @ a.t()
        else:
            rows = meta.sorted_tokens[lo:hi]
            t[rows, : a.shape[0]] = x[rows].float() @ a.t()
    return t


def _decode_rows(segments, x: torch.Tensor, t: torch.Tensor):
    """Row views of x and of t cut to the segments' common rank, made in one op each (a decode step has a
    segment per token: views made one by one would cost more than the matrix-vector products).
    The t rows are None when the segments' ranks differ."""
    ranks = {rank for _, _, _, rank in segments}
    common = ranks.pop() if len(ranks) == 1 else False
    t_rows = None if common is False else (t if common is None else t[:, :common]).unbind(0)
    return x.unbind(0), t_rows


def expand_reference(
    t: torch.Tensor,  # [T, rank] fp32
    b_stack: torch.Tensor,  # [slots, out, rank]
    scales: torch.Tensor,  # [slots] fp32
    meta: LoraBatchMeta,
    y: torch.Tensor,  # [T, out], updated in place
    b_views: SlotViews | None = None,  # cached views of b_stack (same values; saves view creation)
) -> torch.Tensor:
    """Semantics: y[i] += scale[slot[i]] * t[i] @ B[slot[i]]^T for slot[i] >= 0 (fp32 accumulate)."""
    segments = meta.lora_segments()
    scale_of = scales.tolist() if segments else []
    views = b_views or SlotViews(b_stack, rank_dim=2)
    in_place = meta.contiguous and y.dtype == torch.float32
    if in_place:
        y_rows, t_rows = _decode_rows(segments, y, t)
    for lo, hi, slot, rank in segments:
        b = views(slot, rank).float()  # [out, r]
        r = b.shape[1]
        if in_place and hi - lo == 1:
            y_rows[lo].addmv_(b, t_rows[lo] if t_rows is not None else t[lo, :r], alpha=scale_of[slot])
        elif in_place:
            y[lo:hi].addmm_(t[lo:hi, :r], b.t(), alpha=scale_of[slot])
        else:
            rows = slice(lo, hi) if meta.contiguous else meta.sorted_tokens[lo:hi]
            delta = (t[rows, :r] @ b.t()) * scale_of[slot]
            y[rows] = (y[rows].float() + delta).to(y.dtype)
    return y


def nf4_linear_reference(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int, out_features: int) -> torch.Tensor:
    """Semantics: y = x @ W^T with W [N, K] = (code[q] * absmax[block]).reshape(N, K), fp32, where q is
    bitsandbytes' NF4 packing of the row-major W (two 4-bit codes per byte, the even element in the high
    nibble) and block = flat index // blocksize. x [M, K] fp32, packed [N*K/2] uint8, absmax [N*K/bs] fp32,
    code [16] fp32 -> y [M, N] fp32. The oracle of kernels/linear.py."""
    flat = packed.reshape(-1)
    q = torch.stack((flat >> 4, flat & 15), dim=1).reshape(-1).long()
    w = (code[q].reshape(-1, blocksize) * absmax.reshape(-1, 1)).reshape(out_features, -1)
    return x.float() @ w.t()
