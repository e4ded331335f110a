"""The compiled pointwise kernels (kernels/pointwise.py: RMSNorm, rotary embeddings with the KV-cache write) against
their torch references, on fresh random inputs every run; the seed is in every assertion message (rerun a failure
with SEED=<n>). The decoder's use of them is covered by the model parity tests against transformers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import kernels
from kernels import pointwise
from tests.compiler import needs_compiler

pytestmark = needs_compiler


def cpu_ops() -> kernels.KernelBackend:
    """The compiled kernels' backend (the torch reference for a call a kernel cannot take)."""
    return kernels.backend("cpu", "cpu")


def fresh_seed() -> int:
    return int(os.environ.get("SEED") or np.random.SeedSequence().entropy % 10**9)


@pytest.mark.parametrize("rows", [1, 7, 33, 600])  # 600 x 576: above the one-thread threshold
@pytest.mark.parametrize("n", [64, 576, 960])
def test_rms_norm_matches_reference(rows: int, n: int) -> None:
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(rows, n + 8, generator=g) * 3.0
    x = wide[:, 4 : 4 + n]  # rows n + 8 floats apart: the kernel reads the row stride
    w = torch.randn(n, generator=g)
    eps = float(torch.rand((), generator=g)) * 1e-4 + 1e-6
    why = f"seed={seed} rows={rows} n={n}"
    y = cpu_ops().rms_norm(x, w, eps)
    torch.testing.assert_close(y, pointwise.rms_norm_reference(x, w, eps), atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"{m}\n{why}")
    y3 = cpu_ops().rms_norm(x.reshape(1, rows, n), w, eps)  # any leading shape
    assert y3.shape == (1, rows, n) and torch.equal(y3[0], y), why


def test_rms_norm_falls_back_where_the_kernel_cannot_take_the_call() -> None:
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(5, 64, generator=g), torch.randn(64, generator=g)
    for xs, ws in ((x.bfloat16(), w.bfloat16()), (x, w.double()), (x.t().contiguous().t(), w)):
        torch.testing.assert_close(cpu_ops().rms_norm(xs, ws, 1e-6), pointwise.rms_norm_reference(xs, ws, 1e-6),
                                   msg=lambda m: f"{m}\nseed={seed}")
    torch_ops = kernels.backend("cpu", "torch")
    assert torch.equal(torch_ops.rms_norm(x, w, 1e-6), pointwise.rms_norm_reference(x, w, 1e-6)), f"seed={seed}"
    assert cpu_ops().rms_norm(x[:0], w, 1e-6).shape == (0, 64)


def rope_case(seed: int, tokens: int, heads: int, kv_heads: int, dim: int, cache_slots: int):
    """q/k/v as the decoder has them (views of projection outputs [T, heads * dim]), cos/sin [T, 1, dim] of
    random positions, distinct random write slots, caches holding random values."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tokens, heads * dim, generator=g).view(tokens, heads, dim)
    k = torch.randn(tokens, kv_heads * dim, generator=g).view(tokens, kv_heads, dim)
    v = torch.randn(tokens, kv_heads * dim, generator=g).view(tokens, kv_heads, dim)
    positions = torch.randint(0, 8192, (tokens,), generator=g).float()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    emb = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)
    cos, sin = (emb.cos() * 1.1)[:, None], (emb.sin() * 1.1)[:, None]  # a rope type's attention scaling
    slots = torch.randperm(cache_slots, generator=g)[:tokens]
    k_cache = torch.randn(cache_slots, kv_heads, dim, generator=g)
    v_cache = torch.randn(cache_slots, kv_heads, dim, generator=g)
    return q, k, v, cos, sin, slots, k_cache, v_cache


@pytest.mark.parametrize("tokens", [1, 7, 33, 1024])  # 1,024 tokens: above the one-thread threshold
@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (4, 4, 32), (8, 2, 128)])
def test_rope_and_cache_matches_reference(tokens: int, heads: int, kv_heads: int, dim: int) -> None:
    seed = fresh_seed()
    q, k, v, cos, sin, slots, k_cache, v_cache = rope_case(seed, tokens, heads, kv_heads, dim, tokens + 50)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    why = f"seed={seed} T={tokens} heads={heads}/{kv_heads} dim={dim}"
    out = cpu_ops().rope_and_cache(q, k, v, cos, sin, slots, k_cache, v_cache)
    want = pointwise.rope_and_cache_reference(q, k, v, cos, sin, slots, k_ref, v_ref)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"q: {m}\n{why}")
    torch.testing.assert_close(k_cache, k_ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"k cache: {m}\n{why}")
    assert torch.equal(v_cache, v_ref), why  # v is copied, every other slot untouched


def test_rope_and_cache_refuses_a_slot_outside_the_cache() -> None:
    seed = fresh_seed()
    q, k, v, cos, sin, slots, k_cache, v_cache = rope_case(seed, 6, 9, 3, 64, 20)
    before = (k_cache.clone(), v_cache.clone())
    for bad in (20, -1):
        wrong = slots.clone()
        wrong[3] = bad
        with pytest.raises(ValueError, match="outside the cache"):
            cpu_ops().rope_and_cache(q, k, v, cos, sin, wrong, k_cache, v_cache)
        assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1]), f"seed={seed}: nothing written"


def test_rope_and_cache_falls_back_where_the_kernel_cannot_take_the_call() -> None:
    seed = fresh_seed()
    q, k, v, cos, sin, slots, k_cache, v_cache = rope_case(seed, 5, 4, 2, 32, 16)
    cases = {
        "bf16 cache": (q, k, v, k_cache.bfloat16(), v_cache.bfloat16()),
        "heads not adjacent": (q.transpose(0, 1).contiguous().transpose(0, 1), k, v, k_cache, v_cache),
    }
    for name, (qs, ks, vs, kc, vc) in cases.items():
        kc_ref, vc_ref = kc.clone(), vc.clone()
        out = cpu_ops().rope_and_cache(qs, ks, vs, cos, sin, slots, kc, vc)
        want = pointwise.rope_and_cache_reference(qs, ks, vs, cos, sin, slots, kc_ref, vc_ref)
        assert torch.equal(out, want) and torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref), f"{name} seed={seed}"
    kc_ref = k_cache.clone()
    out = kernels.backend("cpu", "torch").rope_and_cache(q, k, v, cos, sin, slots, k_cache, v_cache)
    want = pointwise.rope_and_cache_reference(q, k, v, cos, sin, slots, kc_ref, v_cache.clone())
    assert torch.equal(out, want) and torch.equal(k_cache, kc_ref), f"reference mode; seed={seed}"
