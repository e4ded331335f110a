"""Switchboard's kernels: segmented LoRA (shrink / expand / apply), linear (dense, NF4), pointwise (RMSNorm, rotary
with the KV-cache write) and paged attention, behind one dispatcher.

`backend(device)` resolves the ops of a device once into a KernelBackend (kernels/backend.py), which the model's
layers and the adapter kinds keep and call. `SWITCHBOARD_KERNELS` is read once, at import, into `MODE`: `auto`
(default: "triton" on CUDA, "cpu" (the compiled C++ kernels) on CPU, or "torch" where this machine has no C++
compiler), `cpu`, `triton` (tests run it on CPU with TRITON_INTERPRET=1), or `torch` (the references; `reference`
is the same). `cpu` on a machine that cannot build the kernels is a start-up error (KernelsUnavailable); a kernel
that does not compile always is (KernelBuildError). Tests pick a backend with `backend(device, mode)`, or set
`kernels.MODE` before the model is built.

Note: this package shares its name with the PyPI `kernels` package that transformers and
bitsandbytes probe for; it deliberately has no `get_kernel` and no distribution metadata, so those
probes fall back cleanly (tests/test_engine.py checks it).
"""

from __future__ import annotations

import logging
import os

import torch

from kernels.attention import PagedAttentionMeta, build_paged_attention_meta
from kernels.backend import KernelBackend, LoraGroup, cpu_backend, torch_backend, triton_backend
from kernels.build import KernelBuildError, KernelError, KernelsUnavailable, toolchain_missing
from kernels.meta import LoraBatchMeta, build_lora_meta
from kernels.reference import SlotViews

__all__ = ["MODE", "KernelBackend", "KernelBuildError", "KernelError", "KernelsUnavailable", "LoraBatchMeta",
           "LoraGroup", "PagedAttentionMeta", "SlotViews", "backend", "build_lora_meta", "build_paged_attention_meta",
           "warm_up"]

_log = logging.getLogger(__name__)
MODES = ("auto", "torch", "cpu", "triton", "reference")  # reference = torch
MODE = os.environ.get("SWITCHBOARD_KERNELS", "auto").strip().lower() or "auto"
if MODE not in MODES:
    raise ValueError(f"SWITCHBOARD_KERNELS={MODE!r}: expected one of {', '.join(MODES)}")

_backends: dict[tuple[str, str], KernelBackend] = {}


def backend(device: torch.device | str, mode: str | None = None) -> KernelBackend:
    """The kernels of `device` under `mode` (default: MODE), resolved once per (mode, device type) and shared.

    Raises KernelsUnavailable for `cpu` where no kernel can be built (no C++ compiler or Python headers),
    KernelBuildError when a kernel does not compile, ValueError for an unknown mode."""
    mode = MODE if mode is None else mode
    kind = torch.device(device).type
    found = _backends.get((mode, kind))
    if found is None:
        found = _backends[(mode, kind)] = _resolve(mode, kind)
    return found


def _resolve(mode: str, kind: str) -> KernelBackend:
    if mode not in MODES:
        raise ValueError(f"kernel mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto":
        mode = "triton" if kind == "cuda" else "cpu"
        missing = toolchain_missing() if mode == "cpu" else None
        if missing is not None:
            _log.warning("the compiled CPU kernels are unavailable (%s): the torch references run", missing)
            mode = "torch"
    if mode == "cpu":
        missing = toolchain_missing()
        if missing is not None:
            raise KernelsUnavailable(f"SWITCHBOARD_KERNELS=cpu, but the CPU kernels cannot be built: {missing}")
        return cpu_backend()
    return triton_backend() if mode == "triton" else torch_backend()


def warm_up(device: torch.device) -> None:
    """Resolve the device's backend before serving (builds or loads the compiled CPU kernels: a one-time compile of
    a few seconds, then cached). Raises as backend() does: a start-up error, never a silent fallback."""
    backend(device)
