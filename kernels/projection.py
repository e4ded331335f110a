"""A projection group's base matmuls and LoRA deltas in one compiled call (kernels/csrc/projection.cpp): the
decode step's q/k/v, o, gate/up and down on CPU when LoRA is the step's only adapter kind (a projection of the
group without LoRA tables just gets its base output).

Run one after the other, the base matmul (compute-bound) and the LoRA kernel (bound by memory bandwidth that two
threads share) each use every thread; here a quarter of the threads (at least one) start on the LoRA items while
the others start on the base tiles, and whoever finishes first takes the other's remaining work. Same math as
`kernels.linear` (dense / NF4 tiles) followed by `kernels.lora_apply`, in the same order per output: y = x @ W^T,
then y += scale * delta with delta summed in fp32 exactly as lora_apply sums it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from kernels.build import extension
from kernels.cpu import ApplyTables, CpuApplyPlan, segments
from kernels.linear import dense_weight_fits, nf4_weights_fit
from kernels.meta import LoraBatchMeta

MAX_PROJECTIONS = 8


class BaseFields(NamedTuple):
    """A base weight's fields in the group call (projection.cpp): dense, or NF4 (dense_ptr 0)."""

    dense_ptr: int
    dense_row_stride: int
    packed_ptr: int
    absmax_ptr: int
    code_ptr: int
    blocksize: int
    n_out: int


@dataclass(frozen=True, slots=True)
class BaseSpec:
    """One base projection's weights as the compiled tiles read them (the base layer keeps it while its weights
    stay where they are: server.model.quant's tile_spec)."""

    fields: BaseFields
    n_in: int  # K
    n_out: int  # N
    keep: tuple[torch.Tensor, ...]  # the tensors behind the pointers, kept alive with the spec


def dense_spec(weight: torch.Tensor) -> BaseSpec | None:
    """A dense W [N, K] as kernels.linear's dense kernel takes it (dense_weight_fits), or None."""
    if not dense_weight_fits(weight):
        return None
    n, k = weight.shape
    return BaseSpec(BaseFields(weight.data_ptr(), weight.stride(0), 0, 0, 0, 0, n), k, n, (weight,))


def nf4_spec(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n_out: int,
             n_in: int) -> BaseSpec | None:
    """NF4 weights as kernels.linear's NF4 kernel takes them (nf4_weights_fit), or None."""
    if not nf4_weights_fit(packed, absmax, code, blocksize, n_out, n_in):
        return None
    return BaseSpec(BaseFields(0, 0, packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), blocksize, n_out), n_in,
                    n_out, (packed, absmax, code))


def _kernel():
    return extension("projection")


def available() -> bool:
    """True when the compiled kernel is usable on this machine (builds it on first call)."""
    return _kernel() is not None


def projection_group(x: torch.Tensor, bases: list[BaseSpec], plan: CpuApplyPlan, present: tuple[int, ...],
                     scales: torch.Tensor, meta: LoraBatchMeta, gains: list[torch.Tensor | None] | None = None
                     ) -> list[torch.Tensor] | None:
    """Semantics: ys[p] = x @ W_p^T, then ys[p][i] += scales[slot[i]] * (x[i] @ A_p[slot[i], :r]^T) @
    B_p[slot[i], :, :r]^T for every token i with slot[i] >= 0 (r its adapter's true rank) and every p that has
    LoRA tables, accumulated in fp32; the same math, and the same sums, as kernels.linear's kernels then
    kernels.lora_apply; then ys[p][i] *= gains[p][slot[i]] (DoRA's weight-norm gain) where gains[p] is given and
    p has tables, rounded as that multiply done after. x [T, K] fp32; bases[p] W_p [N_p, K]; plan: the LoRA A / B
    stacks (kernels.cpu.cpu_apply_plan) of the bases present[0], present[1], ... (the others have none); scales
    [slots] fp32; gains[p] [>= slots, N_p] fp32, rows contiguous. Returns the ys [T, N_p] fp32, or None when this
    kernel cannot take the call (the caller runs the two steps)."""
    lib = _kernel()
    n = x.shape[0]
    if (lib is None or not meta.has_lora or n == 0 or x.dtype != torch.float32 or not x.is_cpu or x.dim() != 2
            or x.stride(1) != 1 or len(present) != len(plan.fields) or not bases or len(bases) > MAX_PROJECTIONS
            or scales.dtype != torch.float32 or not scales.is_cpu or plan.n_in != x.shape[1]):
        return None
    lora = [_NO_LORA] * len(bases)
    for i, fields, out in zip(present, plan.fields, plan.outs, strict=True):
        if not 0 <= i < len(bases) or bases[i].n_out != out:
            return None
        lora[i] = fields.lora
    if any(b.n_in != x.shape[1] for b in bases):
        return None
    gains = gains or [None] * len(bases)
    gain_fields = [_gain_fields(g, b.n_out, scales.shape[0]) for g, b in zip(gains, bases, strict=True)]
    if None in gain_fields:
        return None
    ys = [torch.empty(n, b.n_out, dtype=torch.float32) for b in bases]
    desc: list[int] = []
    for base, y, tables, gain in zip(bases, ys, lora, gain_fields, strict=True):
        desc += base.fields
        desc += (y.data_ptr(), y.stride(0))
        desc += tables
        desc += gain
    segs, index = segments(meta)
    lib.group(x.data_ptr(), x.stride(0), n, x.shape[1], plan.w_dtype, scales.data_ptr(), scales.stride(0),
              segs.data_ptr(), segs.shape[0], index, torch.get_num_threads(), *desc)
    return ys


def _gain_fields(gain: torch.Tensor | None, n_out: int, n_slots: int) -> tuple[int, int] | None:
    """(pointer, row stride) of a gain table the kernel can read, (0, 0) for none, None for one it cannot."""
    if gain is None:
        return (0, 0)
    if (gain.dtype != torch.float32 or not gain.is_cpu or gain.dim() != 2 or gain.shape[1] != n_out
            or gain.shape[0] < n_slots or gain.stride(1) != 1):
        return None
    return (gain.data_ptr(), gain.stride(0))


# a projection without LoRA tables: padded rank 0 (its items skip it); B's rank stride 1 satisfies the layout check
_NO_LORA = ApplyTables(0, 0, 0, 0, 0, 0, 0, 1, 0).lora
