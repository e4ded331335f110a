"""The CPU segmented-LoRA kernels: one compiled call per shrink / expand for the whole batch, or per projection
group for both (`cpu_apply`: the decode step's path, no intermediate t tensor).

C++ with OpenMP (kernels/csrc/lora.cpp, built once and cached by kernels/build.py), parallel over work
items of (segment, token block[, rank or output range]); each adapter's A and B is read from memory once
per call, fp32 accumulation, only each adapter's true rank, tokens with slot -1 untouched. B is read in
either layout: row-major [out, rank], or rank-major (the pool's tables, seen as [out, rank] through a
transpose) where a rank-r adapter in a max-rank table reads r contiguous rows and no padding. fp32 and
bf16 activations and tables; any other dtype, a table without a unit-stride inner axis, or a machine
without a C++ compiler falls back explicitly to kernels/reference.py (the oracle). `table_zeros` allocates
slot tables on transparent huge pages.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
import weakref
from dataclasses import dataclass

import torch

from kernels.build import extension
from kernels.meta import LoraBatchMeta
from kernels.reference import expand_reference, shrink_reference

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# the last two metas' (meta, segments [S, 4], index [T]): a step with composed adapters alternates two metas (its
# plain tokens' and its (token, part) pairs', kernels/compose.py) in every layer
_plans: tuple[tuple[LoraBatchMeta, torch.Tensor, torch.Tensor | None], ...] = ()


def _kernels():
    return extension("lora")  # built once, then cached (kernels/build.py)


def available() -> bool:
    """True when the compiled kernel is usable on this machine (builds it on first call)."""
    return _kernels() is not None


def segments(meta: LoraBatchMeta) -> tuple[torch.Tensor, int]:
    """The LoRA segments as an int64 [S, 4] table (lo, hi, slot, rank or -1) and the token index pointer
    (0 when the batch is grouped): made once per step's meta, reused by every layer's calls."""
    global _plans
    plans = _plans  # one read: another thread may replace it meanwhile
    plan = next((p for p in plans if p[0] is meta), None)
    if plan is None:
        rows = [(lo, hi, slot, -1 if rank is None else rank) for lo, hi, slot, rank in meta.lora_segments()]
        index = None if meta.contiguous else meta.sorted_tokens.to(torch.int64).contiguous()
        plan = (meta, torch.tensor(rows, dtype=torch.int64).reshape(-1, 4), index)
        _plans = (plan, *plans[:1])
    return plan[1], 0 if plan[2] is None else plan[2].data_ptr()


def _usable(*tensors: torch.Tensor) -> bool:
    return all(t.dtype in _DTYPES and t.stride(-1) == 1 and not t.is_cuda and not t.is_meta for t in tensors)


def _usable_b(b: torch.Tensor) -> bool:
    """A B stack [slots, out, rank] the kernel reads: row-major (rank contiguous) or rank-major (out contiguous,
    the pool's layout: `[slots, rank, out]` storage seen through a transpose)."""
    return b.dtype in _DTYPES and 1 in (b.stride(1), b.stride(2)) and not b.is_cuda and not b.is_meta


_tables: dict[int, tuple[weakref.ref, tuple[int, ...] | None]] = {}


def _table(a: torch.Tensor) -> tuple[int, ...] | None:
    """(data_ptr, stride 0, stride 1, dim 1, dim 2, dtype code, stride 2) of a [slots, rank|out, in|rank] table,
    or None when the kernel cannot read it (A: `in` contiguous; B: either inner axis contiguous). Cached per
    tensor object: the pool's tables (and the layers' views of them) live for the engine's life and are never
    reallocated, so this saves a dozen attribute reads per call."""
    entry = _tables.get(id(a))
    if entry is not None and entry[0]() is a:
        return entry[1]
    desc = None
    if _usable_b(a):
        desc = (a.data_ptr(), a.stride(0), a.stride(1), a.shape[1], a.shape[2], _DTYPES[a.dtype], a.stride(2))
    if len(_tables) > 4096:
        _tables.clear()
    _tables[id(a)] = (weakref.ref(a), desc)
    return desc


def _a_table(a: torch.Tensor) -> tuple[int, ...] | None:
    d = _table(a)
    return d if d is not None and d[6] == 1 else None


def cpu_shrink_many(x: torch.Tensor, a_stacks: list[torch.Tensor], meta: LoraBatchMeta) -> list[torch.Tensor]:
    """Several shrinks over the same x in one pass (q/k/v, gate/up): the stacks share `in` and dtype (<= 8).

    Semantics: for every stack s, t_s[i, :r] = x[i] @ A_s[slot[i], :r]^T in fp32 for slot[i] >= 0, where r is
    the adapter's true rank (meta.seg_ranks_list; None = the padded rank); t_s[i] = 0 elsewhere.
    x [T, in]; A_s [slots, max_rank_s, in] (a strided view of the pool table is fine); t_s [T, max_rank_s] fp32.
    """
    ts = [torch.zeros(x.shape[0], a.shape[1], dtype=torch.float32) for a in a_stacks]
    if not meta.has_lora or not ts:
        return ts
    lib = _kernels()
    tables = [_a_table(a) for a in a_stacks]
    if (lib is None or None in tables or len({d[5] for d in tables}) > 1 or len(a_stacks) > 8 or not _usable(x)
            or x.shape[0] == 0):
        return [shrink_reference(x, a, meta) for a in a_stacks]
    segs, index = segments(meta)
    desc = []
    for d, t in zip(tables, ts, strict=True):
        desc += (d[0], d[1], d[2], d[3], t.data_ptr(), d[3])
    lib.shrink(x.data_ptr(), x.stride(0), _DTYPES[x.dtype], x.shape[1], tables[0][5],
               segs.data_ptr(), segs.shape[0], index, torch.get_num_threads(), *desc)
    return ts


def cpu_shrink(x: torch.Tensor, a_stack: torch.Tensor, meta: LoraBatchMeta) -> torch.Tensor:
    """Semantics: t[i, :r] = x[i] @ A[slot[i], :r]^T in fp32 for slot[i] >= 0 (r = the adapter's true rank),
    t[i] = 0 otherwise. x [T, in] fp32/bf16, A [slots, max_rank, in], returns t [T, max_rank] fp32."""
    t = torch.zeros(x.shape[0], a_stack.shape[1], dtype=torch.float32)
    if not meta.has_lora:
        return t
    lib = _kernels()
    d = _a_table(a_stack)
    if lib is None or d is None or x.shape[0] == 0 or not _usable(x):
        return shrink_reference(x, a_stack, meta)
    segs, index = segments(meta)
    lib.shrink(x.data_ptr(), x.stride(0), _DTYPES[x.dtype], x.shape[1], d[5], segs.data_ptr(), segs.shape[0], index,
               torch.get_num_threads(), d[0], d[1], d[2], d[3], t.data_ptr(), d[3])
    return t


def cpu_expand(t: torch.Tensor, b_stack: torch.Tensor, scales: torch.Tensor, meta: LoraBatchMeta,
               y: torch.Tensor) -> torch.Tensor:
    """Semantics: y[i] += scale[slot[i]] * t[i, :r] @ B[slot[i], :, :r]^T for slot[i] >= 0, accumulated in fp32
    and rounded once into y's dtype; rows with slot -1 untouched. t [T, max_rank] fp32, B [slots, out, max_rank]
    (rank or out contiguous: a transposed view of a rank-major [slots, max_rank, out] table reads only r rows),
    scales [slots] fp32, y [T, out] fp32/bf16 updated in place and returned."""
    if not meta.has_lora or y.shape[0] == 0:
        return y
    lib = _kernels()
    d = _table(b_stack)
    if (lib is None or d is None or t.dtype != torch.float32 or t.stride(-1) != 1 or not _usable(y)
            or scales.dtype != torch.float32 or scales.is_cuda):
        return expand_reference(t, b_stack, scales, meta, y)
    segs, index = segments(meta)
    lib.expand(t.data_ptr(), t.stride(0), d[0], d[1], d[2], d[6], d[4], d[5], d[3], scales.data_ptr(), scales.stride(0),
               y.data_ptr(), y.stride(0), _DTYPES[y.dtype], segs.data_ptr(), segs.shape[0], index,
               torch.get_num_threads())
    return y


@dataclass(frozen=True, slots=True)
class CpuApplyPlan:
    """One projection group's tables as the compiled apply reads them, checked once: the pool's tables are never
    reallocated, so a group's descriptors are the same at every step and only x, y and the step's segments vary."""

    stacks: tuple[torch.Tensor, ...]  # the A and B stacks described (kept alive while the plan is)
    w_dtype: int  # the tables' dtype code (_DTYPES)
    n_in: int  # x's features
    outs: tuple[int, ...]  # each stack's out features (y's columns)
    fields: tuple[tuple[int, ...], ...]  # per stack: A ptr, strides 0/1, rank rows; B ptr, strides 0/1/2, out


def cpu_apply_plan(a_stacks: list[torch.Tensor], b_stacks: list[torch.Tensor]) -> CpuApplyPlan | None:
    """The plan of cpu_apply for these stacks (A [slots, R_s, in], B [slots, out_s, R_s]), or None when the kernel
    cannot read them (then cpu_apply falls back, as without a plan)."""
    if _kernels() is None or not a_stacks or len(a_stacks) > 8 or len(a_stacks) != len(b_stacks):
        return None
    fields, outs, dtypes = [], [], set()
    for a, b in zip(a_stacks, b_stacks, strict=True):
        da, db = _a_table(a), _table(b)
        if da is None or db is None or da[5] != db[5] or db[4] != da[3] or da[4] != a_stacks[0].shape[2]:
            return None
        dtypes.add(da[5])
        outs.append(db[3])
        fields.append((da[0], da[1], da[2], da[3], db[0], db[1], db[2], db[6], db[3]))
    if len(dtypes) > 1:
        return None
    return CpuApplyPlan((*a_stacks, *b_stacks), dtypes.pop(), a_stacks[0].shape[2], tuple(outs), tuple(fields))


def cpu_apply_planned(x: torch.Tensor, plan: CpuApplyPlan, scales: torch.Tensor, meta: LoraBatchMeta,
                      ys: list[torch.Tensor]) -> bool:
    """cpu_apply over a plan's stacks (see its Semantics); False, having touched nothing, when x, ys or scales are
    not what the kernel reads (the caller falls back)."""
    n = x.shape[0]
    y_dtype = ys[0].dtype if ys else None
    if (n == 0 or x.dtype not in _DTYPES or x.stride(-1) != 1 or not x.is_cpu or x.shape[1] != plan.n_in
            or y_dtype not in _DTYPES or len(ys) != len(plan.fields)):
        return False
    desc: list[int] = []
    for f, out, y in zip(plan.fields, plan.outs, ys, strict=True):
        if y.dtype != y_dtype or y.stride(-1) != 1 or y.shape[0] != n or y.shape[1] != out or not y.is_cpu:
            return False
        desc += f
        desc += (y.data_ptr(), y.stride(0))
    if scales.dtype != torch.float32 or not scales.is_cpu:
        return False
    segs, index = segments(meta)
    _kernels().apply(x.data_ptr(), x.stride(0), _DTYPES[x.dtype], plan.n_in, n, plan.w_dtype, scales.data_ptr(),
                     scales.stride(0), _DTYPES[y_dtype], segs.data_ptr(), segs.shape[0], index,
                     torch.get_num_threads(), *desc)
    return True


def cpu_apply(x: torch.Tensor, a_stacks: list[torch.Tensor], b_stacks: list[torch.Tensor], scales: torch.Tensor,
              meta: LoraBatchMeta, ys: list[torch.Tensor]) -> bool:
    """Shrink + expand of several projections of one x in one compiled call (no t tensor in between).

    Semantics: for every s, ys[s][i] += scale[slot[i]] * (x[i] @ A_s[slot[i], :r]^T) @ B_s[slot[i], :, :r]^T in
    fp32 (rounded once into y's dtype) for slot[i] >= 0; other rows untouched. x [T, in]; A_s [slots, R_s, in];
    B_s [slots, out_s, R_s] (rank or out contiguous); ys[s] [T, out_s], updated in place; scales [slots] fp32.
    Returns False, having touched nothing, when the kernel cannot take these tensors (the caller falls back)."""
    plan = cpu_apply_plan(a_stacks, b_stacks)
    return plan is not None and cpu_apply_planned(x, plan, scales, meta, ys)


_MADV_HUGEPAGE = 14  # linux/mman.h
_HUGE = 1 << 21


def _huge_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty([numel]) on CPU, asked (madvise) to sit on 2 MiB transparent huge pages before its first touch."""
    t = torch.empty(numel, dtype=dtype)
    lo = (t.data_ptr() + _HUGE - 1) // _HUGE * _HUGE
    hi = (t.data_ptr() + t.numel() * t.element_size()) // _HUGE * _HUGE
    if hi > lo and _libc() is not None:
        _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_HUGEPAGE)  # advice only: result unused
    return t


ARENA_ALIGN = 64  # bytes: one cache line, so no 64-byte vector load of a row start splits two lines


def arena_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous copies of CPU `tensors` (equal values, shapes, dtypes) laid out one after another in one
    allocation on transparent huge pages, each starting on a 64-byte boundary. For weights the kernels stream
    every step: a checkpoint's memory-mapped tensors start wherever the file put them (the default model's at 40
    bytes past a cache line, which made every AVX-512 load split two lines: 23% slower dense matmuls, measured side
    by side in the decode step's 211 projections), on 4 KiB page-cache pages; in the arena, in the order given,
    consecutive projections also sit next to each other."""
    if not tensors:
        return []
    nbytes = [t.numel() * t.element_size() for t in tensors]
    offsets, total = [], 0
    for n in nbytes:
        offsets.append(total)
        total += (n + ARENA_ALIGN - 1) // ARENA_ALIGN * ARENA_ALIGN
    raw = _huge_empty(total + ARENA_ALIGN, torch.uint8)
    base = (-raw.data_ptr()) % ARENA_ALIGN
    out = []
    for t, off, n in zip(tensors, offsets, nbytes, strict=True):
        view = raw[base + off : base + off + n].view(t.dtype).view(t.shape)
        out.append(view.copy_(t))
    return out


def table_zeros(*shape: int, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """torch.zeros for a large slot table the CPU kernels stream every step, asked (madvise) to sit on 2 MiB
    transparent huge pages before its first touch: a decode step reads hundreds of MB of such tables in 36 KB
    pieces, and 4 KiB pages cost a TLB miss per page (about 8% of the step's LoRA time, measured side by side).
    Same values as torch.zeros; where huge pages are unavailable (not Linux, THP off) it is exactly torch.zeros."""
    if torch.device(device).type != "cpu":
        return torch.zeros(*shape, dtype=dtype, device=device)
    return _huge_empty(math.prod(shape), dtype).view(*shape).zero_()


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
