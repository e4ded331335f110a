"""LoRA segmented-gather kernels (Triton on CUDA, the compiled CPU kernel on CPU) and paged attention.

`SWITCHBOARD_KERNELS` is read once, at import, into `MODE`: `auto` (default: Triton for CUDA tensors, the
CPU kernel otherwise), `triton` (Triton everywhere; tests run it on CPU with TRITON_INTERPRET=1), `cpu`
(the CPU kernel), `reference` (kernels/reference.py). Tests switch paths by setting `kernels.MODE`.
Triton is imported only when its path is taken. A batch with no LoRA token (`meta.has_lora` False)
launches nothing. `paged_attention` (kernels/attention.py) is the compiled CPU kernel, or the per-sequence
SDPA reference under `reference` and for CUDA tensors.

Note: this package shares its name with the PyPI `kernels` package that transformers and
bitsandbytes probe for; it deliberately has no `get_kernel` and no distribution metadata, so those
probes fall back cleanly (tests/test_engine.py checks it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from kernels import attention as _attention
from kernels.attention import PagedAttentionMeta, build_paged_attention_meta
from kernels.build import KernelBuildError, KernelError, KernelsUnavailable, toolchain_missing
from kernels.cpu import (
    CpuApplyPlan,
    cpu_apply,
    cpu_apply_plan,
    cpu_apply_planned,
    cpu_expand,
    cpu_shrink,
    cpu_shrink_many,
)
from kernels.meta import LoraBatchMeta, build_lora_meta
from kernels.reference import SlotViews, expand_reference, shrink_reference

__all__ = ["MODE", "KernelBuildError", "KernelError", "KernelsUnavailable", "LoraBatchMeta", "LoraGroup",
           "PagedAttentionMeta", "SlotViews", "build_lora_meta", "build_paged_attention_meta", "lora_apply",
           "lora_apply_group", "lora_expand", "lora_group", "lora_shrink", "lora_shrink_many", "paged_attention"]

_log = logging.getLogger(__name__)
MODES = ("auto", "triton", "cpu", "reference")
MODE = os.environ.get("SWITCHBOARD_KERNELS", "auto").strip().lower() or "auto"
if MODE not in MODES:
    raise ValueError(f"SWITCHBOARD_KERNELS={MODE!r}: expected one of {', '.join(MODES)}")


def _path(x: torch.Tensor) -> str:
    if MODE == "auto":
        return "triton" if x.is_cuda else "cpu"
    return MODE


def lora_shrink(
    x: torch.Tensor, a_stack: torch.Tensor, meta: LoraBatchMeta, a_views: SlotViews | None = None
) -> torch.Tensor:
    """Semantics: t[i, :r] = x[i] @ A[slot[i], :r]^T (fp32) for slot[i] >= 0, else 0; r = the adapter's true rank.

    x [T, in], a_stack [slots, max_rank, in] (a strided view of the pool table is fine) -> t [T, max_rank] fp32.
    a_views: cached per-slot views, used only by the reference path (accepted on every path)."""
    if not meta.has_lora:
        return torch.zeros(x.shape[0], a_stack.shape[1], dtype=torch.float32, device=x.device)
    path = _path(x)
    if path == "cpu":
        return cpu_shrink(x, a_stack, meta)
    if path == "triton":
        from kernels.sgmv import sgmv_shrink

        return sgmv_shrink(x, a_stack, meta)
    return shrink_reference(x, a_stack, meta, a_views)


def lora_shrink_many(x: torch.Tensor, a_stacks: list[torch.Tensor], meta: LoraBatchMeta) -> list[torch.Tensor]:
    """Semantics: [lora_shrink(x, a, meta) for a in a_stacks], in one pass over x on CPU (q/k/v, gate/up)."""
    if meta.has_lora and _path(x) == "cpu":
        return cpu_shrink_many(x, a_stacks, meta)
    return [lora_shrink(x, a, meta) for a in a_stacks]


def lora_expand(
    t: torch.Tensor, b_stack: torch.Tensor, scales: torch.Tensor, meta: LoraBatchMeta, y: torch.Tensor,
    b_views: SlotViews | None = None,
) -> torch.Tensor:
    """Semantics: y[i] += scale[slot[i]] * t[i, :r] @ B[slot[i], :, :r]^T for slot[i] >= 0 (fp32 accumulate, in
    place; returns y). t [T, max_rank] fp32, b_stack [slots, out, max_rank], scales [slots] fp32, y [T, out].
    b_views: cached per-slot views, used only by the reference path."""
    if not meta.has_lora:
        return y
    path = _path(t)
    if path == "cpu":
        return cpu_expand(t, b_stack, scales, meta, y)
    if path == "triton":
        from kernels.sgmv import sgmv_expand

        return sgmv_expand(t, b_stack, scales, meta, y)
    return expand_reference(t, b_stack, scales, meta, y, b_views)


@dataclass(frozen=True, slots=True)
class LoraGroup:
    """The A and B stacks of one projection group (q/k/v, gate/up, or one projection) for lora_apply_group, with
    the compiled CPU kernel's plan of them made once (None: not the CPU kernel's tables). Made per layer and group
    once by the adapter pool (tables are never reallocated), so a step's calls only pass x, ys and the meta."""

    a_stacks: tuple[torch.Tensor, ...]  # each [slots, max_rank_s, in]
    b_stacks: tuple[torch.Tensor, ...]  # each [slots, out_s, max_rank_s]
    cpu: CpuApplyPlan | None


def lora_group(a_stacks: list[torch.Tensor], b_stacks: list[torch.Tensor]) -> LoraGroup:
    cpu = None if a_stacks[0].is_cuda else cpu_apply_plan(a_stacks, b_stacks)
    return LoraGroup(tuple(a_stacks), tuple(b_stacks), cpu)


def lora_apply_group(x: torch.Tensor, group: LoraGroup, scales: torch.Tensor, meta: LoraBatchMeta,
                     ys: list[torch.Tensor]) -> list[torch.Tensor]:
    """Semantics: lora_apply(x, group.a_stacks, group.b_stacks, scales, meta, ys), through the group's CPU plan
    where it has one (the same compiled call without re-checking the tables)."""
    if not meta.has_lora:
        return ys
    if _path(x) == "cpu" and group.cpu is not None and cpu_apply_planned(x, group.cpu, scales, meta, ys):
        return ys
    ts = lora_shrink_many(x, list(group.a_stacks), meta)
    return [lora_expand(t, b, scales, meta, y) for t, b, y in zip(ts, group.b_stacks, ys, strict=True)]


def lora_apply(x: torch.Tensor, a_stacks: list[torch.Tensor], b_stacks: list[torch.Tensor], scales: torch.Tensor,
               meta: LoraBatchMeta, ys: list[torch.Tensor]) -> list[torch.Tensor]:
    """Semantics: ys[s] = lora_expand(lora_shrink(x, a_stacks[s]), b_stacks[s], scales, meta, ys[s]) for every s
    (projections of one input: q/k/v, gate/up, or one), in place; returns ys. On CPU one compiled call for the
    group (kernels/cpu.py cpu_apply: no intermediate t, one pass over x); elsewhere the two ops per stack."""
    if not meta.has_lora:
        return ys
    if _path(x) == "cpu" and cpu_apply(x, a_stacks, b_stacks, scales, meta, ys):
        return ys
    ts = lora_shrink_many(x, a_stacks, meta)
    return [lora_expand(t, b, scales, meta, y) for t, b, y in zip(ts, b_stacks, ys, strict=True)]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedAttentionMeta,
                    scale: float) -> torch.Tensor:
    """Semantics: kernels/attention.py (causal attention of each sequence's query rows over its own paged context;
    q [T, H, D], k_cache/v_cache [kv_slots, KVH, D] one layer, out [T, H, D] in q's dtype)."""
    if MODE == "reference":
        return _attention.paged_attention_reference(q, k_cache, v_cache, meta, scale)
    return _attention.paged_attention(q, k_cache, v_cache, meta, scale)


def warm_up(device: torch.device) -> None:
    """Build or load the compiled CPU kernels (a one-time compile of a few seconds, then cached) before serving.

    Raises KernelsUnavailable under `SWITCHBOARD_KERNELS=cpu` on a machine that cannot build them, and
    KernelBuildError when a kernel does not compile (never a silent fallback to the references)."""
    if device.type == "cpu" and MODE in ("auto", "cpu"):
        missing = toolchain_missing()
        if missing is not None:
            if MODE == "cpu":
                raise KernelsUnavailable(f"SWITCHBOARD_KERNELS=cpu, but the CPU kernels cannot be built: {missing}")
            _log.warning("the compiled CPU kernels are unavailable (%s): the torch references run", missing)
            return
        from kernels import attention, cpu, linear, pointwise, projection

        for kernel in (cpu, attention, linear, pointwise, projection):
            kernel.available()
