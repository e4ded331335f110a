"""The CPU segmented-LoRA kernels: one compiled call per shrink / expand for the whole batch.

C++ with OpenMP (kernels/csrc/lora.cpp, built once and cached by kernels/build.py), parallel over work
items of (segment, token block[, rank or output range]); each adapter's A and B is read from memory once
per call, fp32 accumulation, only each adapter's true rank, tokens with slot -1 untouched. fp32 and
bf16 activations and tables; any other dtype, a table whose innermost dimension is strided, or a
machine without a C++ compiler falls back explicitly to kernels/reference.py (the oracle).
"""

from __future__ import annotations

import ctypes

import torch

from kernels.build import library
from kernels.meta import LoraBatchMeta
from kernels.reference import expand_reference, shrink_reference

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_lib: ctypes.CDLL | None = None
_lib_tried = False
_plan: tuple[LoraBatchMeta, torch.Tensor, torch.Tensor | None] | None = None  # (meta, segments [S, 4], index [T])


def _kernels() -> ctypes.CDLL | None:
    global _lib, _lib_tried
    if not _lib_tried:
        _lib_tried = True
        lib = library("lora")
        if lib is not None:
            lib.sb_lora_shrink.argtypes = [_PTR, _I64, _I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64]
            lib.sb_lora_shrink.restype = _I64
            lib.sb_lora_expand.argtypes = [_PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _I64, _PTR,
                                           _I64, _I64, _PTR, _I64, _PTR, _I64]
            lib.sb_lora_expand.restype = _I64
        _lib = lib
    return _lib


def available() -> bool:
    """True when the compiled kernel is usable on this machine (builds it on first call)."""
    return _kernels() is not None


def _segments(meta: LoraBatchMeta) -> tuple[torch.Tensor, int]:
    """The LoRA segments as an int64 [S, 4] table (lo, hi, slot, rank or -1) and the token index pointer
    (0 when the batch is grouped): made once per step's meta, reused by every layer's calls."""
    global _plan
    plan = _plan  # one read: another thread may replace it meanwhile
    if plan is None or plan[0] is not meta:
        rows = [(lo, hi, slot, -1 if rank is None else rank) for lo, hi, slot, rank in meta.lora_segments()]
        index = None if meta.contiguous else meta.sorted_tokens.to(torch.int64).contiguous()
        plan = _plan = (meta, torch.tensor(rows, dtype=torch.int64).reshape(-1, 4), index)
    return plan[1], 0 if plan[2] is None else plan[2].data_ptr()


def _usable(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in _DTYPES and t.stride(-1) == 1 for t in tensors)


def cpu_shrink_many(x: torch.Tensor, a_stacks: list[torch.Tensor], meta: LoraBatchMeta) -> list[torch.Tensor]:
    """Several shrinks over the same x in one pass (q/k/v, gate/up): the stacks share `in` and dtype.

    Semantics: for every stack s, t_s[i, :r] = x[i] @ A_s[slot[i], :r]^T in fp32 for slot[i] >= 0, where r is
    the adapter's true rank (meta.seg_ranks_list; None = the padded rank); t_s[i] = 0 elsewhere.
    x [T, in]; A_s [slots, max_rank_s, in] (a strided view of the pool table is fine); t_s [T, max_rank_s] fp32.
    """
    ts = [torch.zeros(x.shape[0], a.shape[1], dtype=torch.float32) for a in a_stacks]
    if not meta.has_lora or not ts:
        return ts
    lib = _kernels()
    if lib is None or not _usable(x, *a_stacks) or len({a.dtype for a in a_stacks}) > 1 or x.shape[0] == 0:
        return [shrink_reference(x, a, meta) for a in a_stacks]
    segs, index = _segments(meta)
    desc = []
    for a, t in zip(a_stacks, ts, strict=True):
        desc += [a.data_ptr(), a.stride(0), a.stride(1), a.shape[1], t.data_ptr(), t.stride(0)]
    lib.sb_lora_shrink(x.data_ptr(), x.stride(0), _DTYPES[x.dtype], x.shape[1], len(a_stacks),
                       (_I64 * len(desc))(*desc), _DTYPES[a_stacks[0].dtype], segs.data_ptr(), segs.shape[0],
                       index, torch.get_num_threads())
    return ts


def cpu_shrink(x: torch.Tensor, a_stack: torch.Tensor, meta: LoraBatchMeta) -> torch.Tensor:
    """Semantics: t[i, :r] = x[i] @ A[slot[i], :r]^T in fp32 for slot[i] >= 0 (r = the adapter's true rank),
    t[i] = 0 otherwise. x [T, in] fp32/bf16, A [slots, max_rank, in], returns t [T, max_rank] fp32."""
    return cpu_shrink_many(x, [a_stack], meta)[0]


def cpu_expand(t: torch.Tensor, b_stack: torch.Tensor, scales: torch.Tensor, meta: LoraBatchMeta,
               y: torch.Tensor) -> torch.Tensor:
    """Semantics: y[i] += scale[slot[i]] * t[i, :r] @ B[slot[i], :, :r]^T for slot[i] >= 0, accumulated in fp32
    and rounded once into y's dtype; rows with slot -1 untouched. t [T, max_rank] fp32, B [slots, out, max_rank],
    scales [slots] fp32, y [T, out] fp32/bf16 updated in place and returned."""
    if not meta.has_lora or y.shape[0] == 0:
        return y
    lib = _kernels()
    if (lib is None or not _usable(b_stack, y) or t.dtype != torch.float32 or scales.dtype != torch.float32
            or scales.device.type != "cpu"):
        return expand_reference(t, b_stack, scales, meta, y)
    t = t.contiguous()
    segs, index = _segments(meta)
    lib.sb_lora_expand(t.data_ptr(), t.stride(0), b_stack.data_ptr(), b_stack.stride(0), b_stack.stride(1),
                       b_stack.shape[2], _DTYPES[b_stack.dtype], b_stack.shape[1], scales.data_ptr(),
                       scales.stride(0), y.data_ptr(), y.stride(0), _DTYPES[y.dtype], segs.data_ptr(),
                       segs.shape[0], index, torch.get_num_threads())
    return y
