"""One kernel dispatcher: the ops of one device, chosen once (`kernels.backend(device)`) and called by the model and
the adapter kinds through the object they keep.

Backends: "torch" (the references: kernels/reference.py, kernels/pointwise.py's *_reference, the per-sequence SDPA of
kernels/attention.py, F.linear), "cpu" (the compiled C++ kernels: kernels/cpu.py, linear.py, pointwise.py,
attention.py, projection.py) and "triton" (the SGMV LoRA kernels of kernels/sgmv.py; torch for the rest).

One convention: every op returns its result. Below an op, a compiled kernel returns None for a call it cannot take
(a dtype, a layout, a size it is slower at) and the op runs the torch reference right there, so no caller branches.
The one exception is by design optional: `fused_projection` (base matmuls and LoRA deltas in one call) returns None
when it does not fuse, and the caller (StepAdapter.project_with_base's contract) runs the unfused ops; `fuses(x)`
says up front whether it may.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import attention, cpu, linear, pointwise, projection
from kernels.meta import LoraBatchMeta
from kernels.reference import SlotViews, expand_reference, shrink_reference

FUSED_MAX_TOKENS = linear.FUSED_MAX_TOKENS  # the most rows a call the compiled linear / projection tiles take


@dataclass(frozen=True, slots=True)
class LoraGroup:
    """The A and B stacks of one projection group (q/k/v, gate/up, or one projection) for lora_apply_group, with
    the compiled CPU kernel's plan of them made once (None: not the CPU backend's, or tables it cannot read). Made per
    layer and group once by the adapter pool (tables are never reallocated), so a step's calls pass x, ys, the meta."""

    a_stacks: tuple[torch.Tensor, ...]  # each [slots, max_rank_s, in]
    b_stacks: tuple[torch.Tensor, ...]  # each [slots, out_s, max_rank_s]
    cpu: cpu.CpuApplyPlan | None


@dataclass(frozen=True, slots=True)
class KernelBackend:
    """The ops of one device (Semantics: each op's reference; shapes below)."""

    name: str  # "torch", "cpu" or "triton"
    # x [T, in], A [slots, max_rank, in], views -> t [T, max_rank] fp32: t[i, :r] = x[i] @ A[slot[i], :r]^T, 0 off LoRA
    lora_shrink: Callable[[torch.Tensor, torch.Tensor, LoraBatchMeta, SlotViews | None], torch.Tensor]
    lora_shrink_many: Callable[[torch.Tensor, list[torch.Tensor], LoraBatchMeta], list[torch.Tensor]]
    # t, B [slots, out, max_rank], scales [slots] fp32, y [T, out] (in place) -> y += scale * t[:, :r] @ B[:, :, :r]^T
    lora_expand: Callable[..., torch.Tensor]
    lora_group: Callable[[list[torch.Tensor], list[torch.Tensor]], LoraGroup]
    # x, group, scales, meta, ys -> ys, each += its projection's LoRA delta (shrink then expand), in place
    lora_apply_group: Callable[..., list[torch.Tensor]]
    fuses: Callable[[torch.Tensor], bool]  # whether fused_projection may take x
    # x [T, K] fp32, bases (kernels.projection.BaseSpec), group, present, scales, meta, gains -> ys or None
    fused_projection: Callable[..., list[torch.Tensor] | None]
    linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # F.linear(x, W, bias)
    # x [..., K], NF4 weights, bias, a dequantizer of W -> F.linear(x, W, bias), W the NF4 weight's values
    nf4_linear: Callable[[torch.Tensor, linear.Nf4Weights, torch.Tensor | None, Callable[[], torch.Tensor]],
                         torch.Tensor]
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # x [..., N], w [N], eps
    rope_and_cache: Callable[..., torch.Tensor]  # q, k, v, cos, sin, slots, k_cache, v_cache -> rotated q
    paged_attention: Callable[..., torch.Tensor]  # q, k_cache, v_cache, PagedAttentionMeta, scale -> out [T, H, D]

    def lora_apply(self, x: torch.Tensor, a_stacks: list[torch.Tensor], b_stacks: list[torch.Tensor],
                   scales: torch.Tensor, meta: LoraBatchMeta, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        """Semantics: ys[s] = lora_expand(lora_shrink(x, a_stacks[s]), b_stacks[s], scales, meta, ys[s]) for every
        s, in place (a group made for this call: the pool keeps its groups and calls lora_apply_group)."""
        return self.lora_apply_group(x, self.lora_group(a_stacks, b_stacks), scales, meta, ys)


# ---- torch: the references -------------------------------------------------------------------------------------
def _zeros_t(x: torch.Tensor, a_stack: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[0], a_stack.shape[1], dtype=torch.float32, device=x.device)


def _ref_shrink(x, a_stack, meta, a_views=None):
    return shrink_reference(x, a_stack, meta, a_views) if meta.has_lora else _zeros_t(x, a_stack)


def _ref_expand(t, b_stack, scales, meta, y, b_views=None):
    return expand_reference(t, b_stack, scales, meta, y, b_views) if meta.has_lora else y


def _no_plan_group(a_stacks, b_stacks) -> LoraGroup:
    return LoraGroup(tuple(a_stacks), tuple(b_stacks), None)


def _never(*_args) -> None:
    return None


def _no(_x) -> bool:
    return False


def _nf4_reference(x, weights, bias, dequantize):
    return F.linear(x, dequantize(), bias)


def _separate_ops(shrink_many, expand):
    """lora_apply_group as a shrink per stack then an expand per stack."""

    def apply_group(x, group, scales, meta, ys):
        if not meta.has_lora:
            return ys
        ts = shrink_many(x, list(group.a_stacks), meta)
        return [expand(t, b, scales, meta, y) for t, b, y in zip(ts, group.b_stacks, ys, strict=True)]

    return apply_group


def _ref_shrink_many(x, a_stacks, meta):
    return [_ref_shrink(x, a, meta) for a in a_stacks]


def torch_backend(name: str = "torch", shrink=_ref_shrink, shrink_many=_ref_shrink_many,
                  expand=_ref_expand) -> KernelBackend:
    """The references everywhere (and the frame the Triton backend fills with its LoRA kernels)."""
    return KernelBackend(
        name=name, lora_shrink=shrink, lora_shrink_many=shrink_many, lora_expand=expand, lora_group=_no_plan_group,
        lora_apply_group=_separate_ops(shrink_many, expand), fuses=_no, fused_projection=_never, linear=F.linear,
        nf4_linear=_nf4_reference, rms_norm=pointwise.rms_norm_reference,
        rope_and_cache=pointwise.rope_and_cache_reference, paged_attention=attention.paged_attention_checked_reference)


# ---- triton: the SGMV kernels for LoRA ---------------------------------------------------------------------------
def triton_backend() -> KernelBackend:
    from kernels import sgmv  # imports triton: only when this backend is chosen

    def shrink(x, a_stack, meta, a_views=None):
        return sgmv.sgmv_shrink(x, a_stack, meta) if meta.has_lora else _zeros_t(x, a_stack)

    def shrink_many(x, a_stacks, meta):
        return [shrink(x, a, meta) for a in a_stacks]

    def expand(t, b_stack, scales, meta, y, b_views=None):
        return sgmv.sgmv_expand(t, b_stack, scales, meta, y) if meta.has_lora else y

    return torch_backend("triton", shrink, shrink_many, expand)


# ---- cpu: the compiled kernels, the reference where one cannot take a call ------------------------------------------
def _cpu_shrink(x, a_stack, meta, a_views=None):
    if not meta.has_lora:
        return _zeros_t(x, a_stack)
    t = cpu.cpu_shrink(x, a_stack, meta)
    return t if t is not None else shrink_reference(x, a_stack, meta, a_views)


def _cpu_shrink_many(x, a_stacks, meta):
    ts = cpu.cpu_shrink_many(x, a_stacks, meta)
    return ts if ts is not None else [shrink_reference(x, a, meta) for a in a_stacks]


def _cpu_expand(t, b_stack, scales, meta, y, b_views=None):
    if not meta.has_lora:
        return y
    out = cpu.cpu_expand(t, b_stack, scales, meta, y)
    return out if out is not None else expand_reference(t, b_stack, scales, meta, y, b_views)


def _cpu_group(a_stacks, b_stacks) -> LoraGroup:
    return LoraGroup(tuple(a_stacks), tuple(b_stacks), cpu.cpu_apply_plan(a_stacks, b_stacks))


_cpu_separate = _separate_ops(_cpu_shrink_many, _cpu_expand)


def _cpu_apply_group(x, group, scales, meta, ys):
    if not meta.has_lora:
        return ys
    if group.cpu is not None:
        done = cpu.cpu_apply_planned(x, group.cpu, scales, meta, ys)
        if done is not None:
            return done
    return _cpu_separate(x, group, scales, meta, ys)


def _small(x: torch.Tensor) -> bool:
    """x [..., K] is a CPU call of at most FUSED_MAX_TOKENS rows (where the compiled tiles win)."""
    return not x.is_cuda and x.numel() <= FUSED_MAX_TOKENS * max(1, x.shape[-1])


def _cpu_fused_projection(x, bases, group, present, scales, meta, gains=None):
    """Asked after fuses(x) (the caller's check: not repeated here)."""
    if group.cpu is None:
        return None
    return projection.projection_group(x, bases, group.cpu, present, scales, meta, gains)


def _cpu_linear(x, weight, bias=None):
    if _small(x):
        y = linear.dense_linear(x, weight)
        if y is not None:
            return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def _cpu_nf4_linear(x, weights, bias, dequantize):
    if _small(x):
        y = linear.nf4_linear(x, *weights)
        if y is not None:
            return y if bias is None else y + bias
    return F.linear(x, dequantize(), bias)


def _cpu_rms_norm(x, weight, eps):
    y = pointwise.rms_norm_kernel(x, weight, eps)
    return y if y is not None else pointwise.rms_norm_reference(x, weight, eps)


def _cpu_rope_and_cache(q, k, v, cos, sin, slots, k_cache, v_cache):
    out = pointwise.rope_and_cache_kernel(q, k, v, cos, sin, slots, k_cache, v_cache)
    return out if out is not None else pointwise.rope_and_cache_reference(q, k, v, cos, sin, slots, k_cache, v_cache)


def _cpu_paged_attention(q, k_cache, v_cache, meta, scale):
    out = attention.paged_attention_kernel(q, k_cache, v_cache, meta, scale)
    return out if out is not None else attention.paged_attention_reference(q, k_cache, v_cache, meta, scale)


def cpu_backend() -> KernelBackend:
    """The compiled kernels, built (or loaded from the cache) now: KernelBuildError here, not in the first step."""
    for module in (cpu, attention, linear, pointwise, projection):
        module.available()
    return KernelBackend(
        name="cpu", lora_shrink=_cpu_shrink, lora_shrink_many=_cpu_shrink_many, lora_expand=_cpu_expand,
        lora_group=_cpu_group, lora_apply_group=_cpu_apply_group, fuses=_small,
        fused_projection=_cpu_fused_projection, linear=_cpu_linear, nf4_linear=_cpu_nf4_linear,
        rms_norm=_cpu_rms_norm, rope_and_cache=_cpu_rope_and_cache, paged_attention=_cpu_paged_attention)
