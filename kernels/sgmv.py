"""Triton segmented-gather matmuls (Punica's SGMV) for LoRA: one launch for every adapter in the batch.

Tokens arrive in any order; `LoraBatchMeta` lists them sorted by adapter slot and cut into segments.
Each program takes BLOCK_M tokens of one segment (gathered through `sorted_tokens`) and multiplies
them by that segment's adapter matrix, accumulating in fp32. Segments with slot -1 are not launched.
Operands are upcast to fp32 before `tl.dot` (IEEE precision): exact against the reference, and it
sidesteps the interpreter's broken bf16 dot. Ranks are padded to a 16-wide tile by masking.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.meta import LoraBatchMeta

BLOCK_M = 16
BLOCK_K = 32
BLOCK_N = 32


@triton.jit
def _segment_tokens(tokens_ptr, seg_begin_ptr, seg_end_ptr, seg_slots_ptr, BLOCK_M: tl.constexpr):
    """This program's BLOCK_M token indices (and mask) within segment program_id(0), and its adapter slot."""
    seg = tl.program_id(0)
    start = tl.load(seg_begin_ptr + seg)
    end = tl.load(seg_end_ptr + seg)
    m = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < end
    tok = tl.load(tokens_ptr + m, mask=m_mask, other=0)
    return tok, m_mask, tl.load(seg_slots_ptr + seg).to(tl.int64)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, out_ptr, tokens_ptr, seg_begin_ptr, seg_end_ptr, seg_slots_ptr,
    K, R,
    sxm, sxk, sas, sar, sak, som, sor,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    tok, m_mask, slot = _segment_tokens(tokens_ptr, seg_begin_ptr, seg_end_ptr, seg_slots_ptr, BLOCK_M)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + tok[:, None] * sxm + k[None, :] * sxk,
                    mask=m_mask[:, None] & (k[None, :] < K), other=0.0).to(tl.float32)
        a = tl.load(a_ptr + slot * sas + r[None, :] * sar + k[:, None] * sak,
                    mask=(r[None, :] < R) & (k[:, None] < K), other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_R]
        acc += tl.dot(x, a, input_precision="ieee")
    tl.store(out_ptr + tok[:, None] * som + r[None, :] * sor, acc, mask=m_mask[:, None] & (r[None, :] < R))


@triton.jit
def _expand_kernel(
    t_ptr, b_ptr, scale_ptr, y_ptr, tokens_ptr, seg_begin_ptr, seg_end_ptr, seg_slots_ptr,
    N, R,
    stm, str_, sbs, sbn, sbr, sym, syn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    tok, m_mask, slot = _segment_tokens(tokens_ptr, seg_begin_ptr, seg_end_ptr, seg_slots_ptr, BLOCK_M)
    r = tl.arange(0, BLOCK_R)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.load(t_ptr + tok[:, None] * stm + r[None, :] * str_,
                mask=m_mask[:, None] & (r[None, :] < R), other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_R]
    b = tl.load(b_ptr + slot * sbs + n[None, :] * sbn + r[:, None] * sbr,
                mask=(n[None, :] < N) & (r[:, None] < R), other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_N]
    scale = tl.load(scale_ptr + slot)
    delta = tl.dot(t, b, input_precision="ieee") * scale
    y_ptrs = y_ptr + tok[:, None] * sym + n[None, :] * syn
    y_mask = m_mask[:, None] & (n[None, :] < N)
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=y_mask)


def _launch_segments(meta: LoraBatchMeta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """Begin/end offsets (into sorted_tokens) and slots of the segments that have a LoRA, and the longest."""
    keep = [k for k, s in enumerate(meta.seg_slots_list) if s >= 0]
    if not keep:
        return None
    starts = meta.seg_starts_list
    dev = meta.sorted_tokens.device
    begin = torch.tensor([starts[k] for k in keep], dtype=torch.int64, device=dev)
    end = torch.tensor([starts[k + 1] for k in keep], dtype=torch.int64, device=dev)
    slots = torch.tensor([meta.seg_slots_list[k] for k in keep], dtype=torch.int32, device=dev)
    return begin, end, slots, max(starts[k + 1] - starts[k] for k in keep)


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def sgmv_shrink(x: torch.Tensor, a_stack: torch.Tensor, meta: LoraBatchMeta) -> torch.Tensor:
    """Semantics: t[i] = x[i] @ A[slot[i]]^T (fp32), 0 where slot[i] = -1.

    x [T, in], a_stack [slots, rank, in] (any strides); returns t [T, rank] fp32. Per segment s with
    slot j over sorted tokens idx[b_s:e_s]: t[idx[b_s:e_s]] = x[idx[b_s:e_s]] @ A[j]^T.
    """
    t = torch.zeros(x.shape[0], a_stack.shape[1], dtype=torch.float32, device=x.device)
    launch = _launch_segments(meta)
    if launch is None:
        return t
    begin, end, slots, longest = launch
    rank, k = a_stack.shape[1], a_stack.shape[2]
    grid = (slots.numel(), triton.cdiv(longest, BLOCK_M))
    _shrink_kernel[grid](
        x, a_stack, t, meta.sorted_tokens, begin, end, slots, k, rank,
        x.stride(0), x.stride(1), a_stack.stride(0), a_stack.stride(1), a_stack.stride(2), t.stride(0), t.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=_block_r(rank),
    )
    return t


def sgmv_expand(
    t: torch.Tensor, b_stack: torch.Tensor, scales: torch.Tensor, meta: LoraBatchMeta, y: torch.Tensor
) -> torch.Tensor:
    """Semantics: y[i] += scale[slot[i]] * t[i] @ B[slot[i]]^T for slot[i] >= 0 (fp32 accumulate), in place.

    t [T, rank] fp32, b_stack [slots, out, rank] (any strides), scales [slots] fp32, y [T, out].
    Per segment s with slot j: y[idx[b_s:e_s]] += scale[j] * t[idx[b_s:e_s]] @ B[j]^T. Returns y.
    """
    launch = _launch_segments(meta)
    if launch is None:
        return y
    begin, end, slots, longest = launch
    n_out, rank = b_stack.shape[1], b_stack.shape[2]
    grid = (slots.numel(), triton.cdiv(longest, BLOCK_M), triton.cdiv(n_out, BLOCK_N))
    _expand_kernel[grid](
        t, b_stack, scales, y, meta.sorted_tokens, begin, end, slots, n_out, rank,
        t.stride(0), t.stride(1), b_stack.stride(0), b_stack.stride(1), b_stack.stride(2), y.stride(0), y.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=_block_r(rank),
    )
    return y
