"""Linear layers on CPU for decode-sized calls (kernels/csrc/linear.cpp, built once, cached): NF4 with the
dequantization fused into the matmul, and dense fp32 through the same tiles and register blocks.

Dequantize-then-matmul (what bitsandbytes does on CPU) writes every weight out as fp32 and reads it back:
per decode step of the 135M default model ~540 MB written and read for 70 MB of NF4 codes. Here each
thread dequantizes a tile of 16 output rows into a private L2-resident buffer and runs every token against
it, so W is read once, as 4-bit codes. fp32 activations only; anything else (another dtype, K not a
multiple of the block size) returns None and kernels/backend.py keeps bitsandbytes' path (F.linear). The dense
kernel reads each tile of 16 weight rows in place (the first token block pulls it into cache): at up to 64 tokens
it measured 2x torch's F.linear on this machine (bench/probes/nf4_linear.py), whose blocking is tuned for large calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from kernels.build import extension

# Above this many tokens per call the dense matmul's blocking wins over the fused kernel's register blocks
# (bench/probes/nf4_linear.py, 2 threads: fused 2.1x bitsandbytes at 32 tokens, 0.96x at 128, 0.88x at 512), so
# prefill chunks keep bitsandbytes' dequantize-then-matmul.
# (kernels/backend.py sends only calls of up to this many rows here.)
FUSED_MAX_TOKENS = 64


class Nf4Weights(NamedTuple):
    """An NF4 weight as nf4_linear takes it (bitsandbytes' CPU layout; nf4_weights_fit says which fit)."""

    packed: torch.Tensor  # [N*K/2] uint8, two 4-bit codes per byte
    absmax: torch.Tensor  # [N*K/blocksize] fp32
    code: torch.Tensor  # [16] fp32
    blocksize: int
    out_features: int  # N


def _kernel():
    return extension("linear")


def available() -> bool:
    return _kernel() is not None


def nf4_weights_fit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                    out_features: int, in_features: int) -> bool:
    """NF4 weights these kernels read: bitsandbytes' layout on CPU (packed [N*K/2] uint8, absmax [N*K/blocksize]
    fp32, code [16] fp32, all contiguous), K a multiple of the block size, the block size a multiple of 32."""
    return (packed.dtype == torch.uint8 and absmax.dtype == torch.float32 and code.dtype == torch.float32
            and code.numel() == 16 and in_features % blocksize == 0 and blocksize % 32 == 0
            and packed.numel() * 2 == out_features * in_features
            and all(t.is_cpu and t.is_contiguous() for t in (packed, absmax, code)))


def dense_weight_fits(weight: torch.Tensor) -> bool:
    """A dense weight these kernels read in place: W [N, K] fp32 on CPU, unit inner stride, K a multiple of 16."""
    return (weight.dtype == torch.float32 and weight.is_cpu and weight.dim() == 2 and weight.stride(1) == 1
            and weight.shape[1] % 16 == 0)


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
               out_features: int) -> torch.Tensor | None:
    """Semantics: y = x @ W^T, W [N, K] = (code[q] * absmax[flat // blocksize]).reshape(N, K), fp32; the same
    math as kernels.reference.nf4_linear_reference (the oracle), summed in another order (fp32 rounding).

    x [..., K] fp32, packed [N*K/2] uint8 (bitsandbytes' NF4 layout), absmax [N*K/blocksize] fp32, code [16]
    fp32 -> y [..., N] fp32, or None when this kernel cannot take the call."""
    lib = _kernel()
    k = x.shape[-1]
    if (lib is None or x.dtype != torch.float32 or x.is_cuda
            or not nf4_weights_fit(packed, absmax, code, blocksize, out_features, k)):
        return None
    return _rows_call(x, out_features, lambda x2, y: lib.linear(
        x2.data_ptr(), x2.stride(0), x2.shape[0], k, packed.data_ptr(), absmax.data_ptr(), code.data_ptr(),
        blocksize, out_features, y.data_ptr(), y.stride(0), torch.get_num_threads()))


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """Semantics: y = x @ W^T in fp32 (F.linear's math, summed in another order). x [..., K] fp32, W [N, K] fp32
    with unit inner stride -> y [..., N] fp32, or None when this kernel cannot take the call (the caller keeps
    F.linear)."""
    lib = _kernel()
    k = x.shape[-1]
    if lib is None or x.dtype != torch.float32 or x.is_cuda or not dense_weight_fits(weight) or weight.shape[1] != k:
        return None
    n = weight.shape[0]
    return _rows_call(x, n, lambda x2, y: lib.dense(
        x2.data_ptr(), x2.stride(0), x2.shape[0], k, weight.data_ptr(), weight.stride(0), n, y.data_ptr(),
        y.stride(0), torch.get_num_threads()))


def _rows_call(x: torch.Tensor, n: int, call: Callable[[torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
    """x [..., K] seen as rows [M, K] with a unit inner stride, y [M, N] fp32 filled by call(rows, y) (skipped for
    M = 0), returned as [..., N]."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty(rows.shape[0], n, dtype=torch.float32)
    if rows.shape[0]:
        call(rows, y)
    return y.reshape(*x.shape[:-1], n)
