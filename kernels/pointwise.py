"""A decoder layer's pointwise work: RMSNorm, and rotary embeddings with the KV-cache write.

Each op has a torch reference (`*_reference`, the oracle and the fallback) and, for fp32 CPU tensors, a compiled
kernel (`*_kernel`: kernels/csrc/pointwise.cpp, built once, cached; the "cpu" backend's): one pass over the rows
instead of several small torch ops per call, which at decode sizes cost many times the arithmetic (bench/step_parts.py:
RMSNorm and rotary ~6% of a 32-sequence decode step of the default model). A kernel returns None for anything
else (CUDA, bf16, odd strides), and kernels/backend.py runs the reference.
"""

from __future__ import annotations

import functools
import struct

import torch
import torch.nn.functional as F

from kernels.build import extension


def _lib():
    return extension("pointwise")


def available() -> bool:
    """True when the compiled kernels are usable on this machine (builds them on first call)."""
    return _lib() is not None


def _rows(x: torch.Tensor) -> bool:
    """x is a CPU fp32 matrix whose rows have a unit inner stride."""
    return x.dim() == 2 and x.dtype == torch.float32 and not x.is_cuda and x.stride(1) == 1


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis, computed in fp32 and returned in x's dtype (RMSNorm before
    its weight; LongLoRA multiplies in a weight per token)."""
    if x.dtype == torch.float32:  # the same math in one fused op
        return F.rms_norm(x, (x.shape[-1],), None, eps)
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 as transformers' LlamaRMSNorm does."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:  # the same math in one fused op
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * rms_normalize(x, eps)


def rms_norm_kernel(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Semantics: y[..., i] = x[..., i] / sqrt(mean_j(x[..., j]^2) + eps) * w[i] (fp32), x [..., N], w [N] -> y
    [..., N]; rms_norm_reference is the oracle (summed in another order: fp32 rounding). None when the kernel
    cannot take the call."""
    lib = _lib()
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (reshape costs ~2 us: decoder calls are 2-D)
    if (lib is None or not _rows(rows) or weight.dtype != torch.float32 or weight.is_cuda
            or weight.shape != (x.shape[-1],) or not weight.is_contiguous()):
        return None
    y = rows.new_empty(rows.shape)
    if rows.shape[0]:
        lib.rms_norm(rows.data_ptr(), rows.stride(0), rows.shape[0], rows.shape[1], weight.data_ptr(),
                     _float_bits(eps), y.data_ptr(), y.stride(0), torch.get_num_threads())
    return y if y.shape == x.shape else y.reshape(x.shape)


@functools.lru_cache(maxsize=16)
def _float_bits(value: float) -> int:
    """The float32 bit pattern of value (how an fp32 scalar crosses the int-only kernel interface)."""
    return struct.unpack("<I", struct.pack("<f", value))[0]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embeddings, HF Llama's rotate-half convention: x [T, heads, D], cos/sin [T, 1, D] -> rotated."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_and_cache_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor) -> torch.Tensor:
    """k_cache[slots] = rotate(k), v_cache[slots] = v; returns rotate(q)."""
    k_cache[slots] = rotate(k, cos, sin).to(k_cache.dtype)
    v_cache[slots] = v.to(v_cache.dtype)
    return rotate(q, cos, sin)


def rope_and_cache_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor | None:
    """Semantics: with rotate(x)[.., i] = x_i cos_i - x_{i+D/2} sin_i for i < D/2 and x_i cos_i + x_{i-D/2} sin_i
    above (rotate-half RoPE), k_cache[slots[t]] = rotate(k[t]), v_cache[slots[t]] = v[t], and the result is rotate(q)
    (fp32); rope_and_cache_reference is the oracle.

    q [T, H, D], k/v [T, KVH, D], cos/sin [T, 1, D], slots [T] int64, k_cache/v_cache [kv_slots, KVH, D] -> [T, H, D].
    Raises ValueError when a slot lies outside the cache (nothing is written then); None (nothing written) when the
    kernel cannot take the call."""
    lib = _lib()
    t, heads, dim = q.shape
    kv_heads = k.shape[1]
    tensors = (q, k, v, k_cache, v_cache)
    if (lib is None or dim % 2 or any(x.dtype != torch.float32 or x.is_cuda or x.stride(2) != 1
                                      or x.stride(1) != dim for x in tensors)
            or k.shape != v.shape or k_cache.shape[1:] != (kv_heads, dim) or v_cache.shape != k_cache.shape
            or cos.dtype != torch.float32 or sin.dtype != torch.float32 or slots.dtype != torch.int64
            or slots.is_cuda or slots.shape != (t,)):
        return None
    cos2, sin2 = cos.reshape(t, dim).contiguous(), sin.reshape(t, dim).contiguous()
    slots = slots.contiguous()
    out = q.new_empty((t, heads, dim))
    if t == 0:
        return out
    rc = lib.rope_cache(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), t, heads,
                        kv_heads, dim, cos2.data_ptr(), sin2.data_ptr(), slots.data_ptr(), k_cache.shape[0],
                        k_cache.data_ptr(), k_cache.stride(0), v_cache.data_ptr(), v_cache.stride(0), out.data_ptr(),
                        out.stride(0), torch.get_num_threads())
    if rc < 0:
        raise ValueError(f"a KV write slot lies outside the cache ({k_cache.shape[0]} slots)")
    return out
