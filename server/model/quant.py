"""Base-model linear projections: NF4 (bitsandbytes) or dense, through the device's kernel backend (kernels.backend):
on CPU, dense fp32 calls of up to kernels.linear.FUSED_MAX_TOKENS rows run kernels/linear.py's dense kernel (2x
F.linear at decode sizes).

NF4 follows QLoRA: `bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")`,
with double quantization (compress_statistics) where the backend supports it. bitsandbytes 0.50
runs NF4 on CPU as well as on CUDA. On CPU with fp32 compute we run kernels/linear.py: the dequantization
fused into the matmul, tile by tile in cache, so the weights are read as 4-bit codes and never written out
as fp32 (measured 2x bitsandbytes' dequantize-then-matmul and faster than the dense fp32 matmul at decode
batch sizes, up to kernels.linear.FUSED_MAX_TOKENS rows: bench/probes/nf4_linear.py); longer calls (prefill), other
compute dtypes, or the torch backend (`SWITCHBOARD_KERNELS=torch`), dequantize and
run a dense matmul in the compute dtype (exact with respect to the stored NF4 weights); on CUDA we call
`bitsandbytes.matmul_4bit`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

import kernels
from kernels.linear import Nf4Weights
from kernels.projection import BaseSpec, dense_spec, nf4_spec

NF4_BLOCKSIZE = 64


def quiet_bnb_kernel_probe() -> None:
    """bitsandbytes' CPU backend tries the hub-only PyPI `kernels` package for an optional fused bf16 kernel
    and logs a warning naming ours (which has no `get_kernel`); we never use that path (see NF4Linear).
    Call before anything imports bitsandbytes (peft and transformers' quantizers do)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _bnb():
    quiet_bnb_kernel_probe()
    import bitsandbytes as bnb  # imported lazily: importing it costs ~1 s

    return bnb


def _plus_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


def _cached(layer: nn.Module, attr: str, where: object, make: Callable[[], object]) -> object:
    """layer's `attr`, made again (make()) only when its weights' storage `where` moved since the last one (loading
    moves CPU weights once, into the weights arena)."""
    cached = getattr(layer, attr, None)
    if cached is None or cached[0] != where:
        cached = (where, make())
        setattr(layer, attr, cached)
    return cached[1]


class DenseLinear(nn.Module):
    """y = x @ W^T (+ b). The dense reference (`--no-quantize`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 backend: kernels.KernelBackend | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # [out]
        self.out_features, self.in_features = weight.shape
        self.kernels = backend or kernels.backend(weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear(x, self.weight, self.bias)

    def tile_spec(self) -> BaseSpec | None:
        """This layer as kernels.projection's tiles read it (the same math as forward on a decode-sized fp32 CPU
        call), or None (a bias, another dtype or device). Kept while the weight stays where it is (loading moves
        it once, into the weights arena)."""
        return _cached(self, "_tile_spec", self.weight.data_ptr(),
                       lambda: None if self.bias is not None else dense_spec(self.weight))


class NF4Linear(nn.Module):
    """y = x @ dequant_nf4(Wq)^T (+ b), weights stored as packed 4-bit NF4 codes + absmax per block."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype, double_quant: bool,
        backend: kernels.KernelBackend | None = None,
    ) -> None:
        super().__init__()
        self.kernels = backend or kernels.backend(weight.device)
        bnb = _bnb()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        packed, state = bnb.functional.quantize_4bit(
            weight.to(compute_dtype),
            blocksize=NF4_BLOCKSIZE,
            quant_type="nf4",
            compress_statistics=double_quant,
        )
        self.register_buffer("packed", packed, persistent=False)  # [out*in/2, 1] uint8
        self.quant_state = state
        self._nf4: Nf4Weights | None = None  # nf4_weights()' cache
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)

    def dense_weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] in the compute dtype (what the NF4 layer multiplies by)."""
        return _bnb().functional.dequantize_4bit(self.packed, self.quant_state).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return _plus_bias(_bnb().matmul_4bit(x, self.packed.t(), quant_state=self.quant_state), self.bias)
        return self.kernels.nf4_linear(x, self.nf4_weights(), self.bias, self.dense_weight)

    def nf4_weights(self) -> Nf4Weights:
        """The NF4 codes as kernels.linear reads them, made again only when the tensors are replaced (loading moves
        `packed` into the weights arena once)."""
        packed, state, made = self.packed, self.quant_state, self._nf4
        if made is None or made.packed is not packed or made.absmax is not state.absmax:
            made = self._nf4 = Nf4Weights(packed, state.absmax, state.code, state.blocksize, self.out_features)
        return made

    def tile_spec(self) -> BaseSpec | None:
        """As DenseLinear.tile_spec: the NF4 codes for the fused kernel's tiles, or None (bias, dtype, device)."""
        state = self.quant_state

        def make() -> BaseSpec | None:
            if self.bias is not None or self.compute_dtype != torch.float32 or self.packed.is_cuda:
                return None
            return nf4_spec(self.packed, state.absmax, state.code, state.blocksize, self.out_features,
                            self.in_features)

        return _cached(self, "_tile_spec", (self.packed.data_ptr(), state.absmax.data_ptr()), make)

    def nbytes(self) -> int:
        state = self.quant_state
        extra = state.absmax.numel() * state.absmax.element_size()
        if getattr(state, "state2", None) is not None:
            extra += state.state2.absmax.numel() * state.state2.absmax.element_size()
        return self.packed.numel() + extra


def make_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, *, quantize: bool, dtype: torch.dtype,
    backend: kernels.KernelBackend | None = None,
) -> nn.Module:
    """A base projection from a dense [out, in] weight; NF4 when `quantize`."""
    if not quantize:
        return DenseLinear(weight.to(dtype), None if bias is None else bias.to(dtype), backend)
    # double quantization where the backend has it: bitsandbytes' CPU path (and transformers on CPU) has none
    return NF4Linear(weight, bias, dtype, double_quant=weight.is_cuda, backend=backend)
