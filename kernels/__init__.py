"""LoRA segmented-gather kernels: Triton on CUDA, the torch reference on CPU.

`SWITCHBOARD_KERNELS=triton` forces the Triton path (tests run it on CPU with TRITON_INTERPRET=1);
`=reference` forces the reference. Triton is imported only when its path is taken.

Note: this package shares its name with the PyPI `kernels` package that transformers and
bitsandbytes probe for; it deliberately has no `get_kernel` and no distribution metadata, so those
probes fall back cleanly (tests/test_engine.py checks it).
"""

from __future__ import annotations

import os

import torch

from kernels.meta import LoraBatchMeta, build_lora_meta
from kernels.reference import SlotViews, expand_reference, shrink_reference

__all__ = ["LoraBatchMeta", "SlotViews", "build_lora_meta", "lora_expand", "lora_shrink"]


def _use_triton(x: torch.Tensor) -> bool:
    mode = os.environ.get("SWITCHBOARD_KERNELS", "auto")
    if mode == "reference":
        return False
    return mode == "triton" or x.is_cuda


def lora_shrink(
    x: torch.Tensor, a_stack: torch.Tensor, meta: LoraBatchMeta, a_views: SlotViews | None = None
) -> torch.Tensor:
    """t [T, rank] fp32 = x @ A[slot]^T per token (0 where slot = -1). a_views: the CPU path's cached views."""
    if _use_triton(x):
        from kernels.sgmv import sgmv_shrink

        return sgmv_shrink(x, a_stack, meta)
    return shrink_reference(x, a_stack, meta, a_views)


def lora_expand(
    t: torch.Tensor, b_stack: torch.Tensor, scales: torch.Tensor, meta: LoraBatchMeta, y: torch.Tensor,
    b_views: SlotViews | None = None,
) -> torch.Tensor:
    """y += scale[slot] * t @ B[slot]^T per token (in place; returns y). b_views: the CPU path's cached views."""
    if _use_triton(t):
        from kernels.sgmv import sgmv_expand

        return sgmv_expand(t, b_stack, scales, meta, y)
    return expand_reference(t, b_stack, scales, meta, y, b_views)
