"""Paged attention (kernels/attention.py): the compiled kernel vs the reference vs a dense causal SDPA in fp64,
and vs today's model path (gather every context into a padded [B, kv_max] batch with a dense mask).

Each case writes every sequence's dense K/V into a shuffled paged cache whose unused slots (free blocks and
the tail of each last block) hold NaN, so reading outside a context shows. Fresh random inputs every run;
the seed is in every assertion message (rerun a failure with SEED=<n>).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import kernels
from kernels import attention as att
from kernels.attention import build_paged_attention_meta, paged_attention_reference
from tests.compiler import needs_compiler
from tests.padded_attention import padded_gather_attention

TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}  # atol on outputs of magnitude ~1


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float) -> torch.Tensor:
    """The CPU backend's op (SWITCHBOARD_KERNELS, auto by default): the compiled kernel, the reference where it
    cannot take the call."""
    return kernels.backend("cpu").paged_attention(q, k_cache, v_cache, meta, scale)


def fresh_seed() -> int:
    return int(os.environ.get("SEED") or np.random.SeedSequence().entropy % 10**9)


def make_case(seed: int, seqs: list[tuple[int, int]], heads: int, kv_heads: int, dim: int, block_size: int,
              dtype: torch.dtype):
    """seqs: (q_len, context_len) per sequence. Returns q, caches, meta, dense per-sequence (K, V) [ctx, KVH, D]."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    need = [-(-ctx // block_size) for _, ctx in seqs]
    n_blocks = sum(need) + 3  # a few free blocks
    order = rng.permutation(n_blocks)
    k_cache = torch.full((n_blocks * block_size, kv_heads, dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    tables, dense, used = [], [], 0
    width = max(need) + 1
    for (_, ctx), n in zip(seqs, need, strict=True):
        blocks = order[used : used + n].tolist()
        used += n
        tables.append(blocks + [-1] * (width - n))
        keys = torch.randn(ctx, kv_heads, dim, generator=g).to(dtype)
        values = torch.randn(ctx, kv_heads, dim, generator=g).to(dtype)
        i = torch.arange(ctx)
        slots = torch.tensor(blocks, dtype=torch.int64)[i // block_size] * block_size + i % block_size
        k_cache[slots], v_cache[slots] = keys, values
        dense.append((keys, values))
    q = torch.randn(sum(q for q, _ in seqs), heads, dim, generator=g).to(dtype)
    meta = build_paged_attention_meta([q for q, _ in seqs], [c for _, c in seqs], tables, block_size, n_blocks)
    return q, k_cache, v_cache, meta, dense


def dense_oracle(q, dense, seqs, scale) -> torch.Tensor:
    """fp64 causal attention over each sequence's contiguous K/V (no block tables involved)."""
    outs, start = [], 0
    group = q.shape[1] // dense[0][0].shape[1]
    for (q_len, ctx), (keys, values) in zip(seqs, dense, strict=True):
        qs = q[start : start + q_len].double().transpose(0, 1)  # [H, q, D]
        k = keys.double().repeat_interleave(group, dim=1).transpose(0, 1)
        v = values.double().repeat_interleave(group, dim=1).transpose(0, 1)
        mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - q_len, ctx)[:, None]
        scores = (qs @ k.transpose(1, 2) * scale).masked_fill(~mask, float("-inf"))
        outs.append((scores.softmax(-1) @ v).transpose(0, 1))
        start += q_len
    return torch.cat(outs)


DECODE_MIX = [(1, c) for c in (1, 2, 7, 16, 17, 100, 513, 1024, 4096)]
CASES = {
    "decode-mixed": DECODE_MIX,
    "decode-one-long": [(1, 4096)],
    "decode-two": [(1, 3000), (1, 1500)],
    "prefill-full": [(128, 128), (1, 60), (33, 33)],
    "chunked-prefill": [(37, 300), (5, 4096), (1, 9), (64, 1000)],
    "prefix-like": [(20, 30), (1, 11), (16, 16), (70, 80)],  # the first 10 context entries stand for prefix K/V
    "long-chunks": [(700, 2500), (1, 2000), (300, 300), (2048, 2048), (100, 150)],  # hybrid: flash and kernel
}


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block_size"),
                         [(9, 3, 64, 16), (8, 8, 32, 32), (8, 1, 128, 16), (4, 2, 64, 1)],
                         ids=["gqa3", "mha", "mqa", "block1"])
@pytest.mark.parametrize("route", ["hybrid", "kernel-only", "flash-all"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference_and_dense(case: str, route: str, heads: int, kv_heads: int, dim: int,
                                            block_size: int, dtype: torch.dtype,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """hybrid: long prefill chunks take the flash path (the default); kernel-only: every row takes the kernel;
    flash-all: every chunk of 2 or more rows takes the flash path."""
    if route == "kernel-only":
        monkeypatch.setattr(att, "FLASH_MIN_Q", 0)
    elif route == "flash-all":
        monkeypatch.setattr(att, "FLASH_MIN_Q", 2)
        monkeypatch.setattr(att, "FLASH_ALWAYS_Q", 2)
    seed = fresh_seed()
    seqs = CASES[case]
    if block_size == 1:
        seqs = [(min(q, 64), min(c, 300)) for q, c in seqs]  # one slot per block: keep the tables short
    q, k_cache, v_cache, meta, dense = make_case(seed, seqs, heads, kv_heads, dim, block_size, dtype)
    scale = dim**-0.5
    why = f"seed={seed} {case} {route} H={heads} KVH={kv_heads} D={dim} bs={block_size} {dtype}"
    out = paged_attention(q, k_cache, v_cache, meta, scale)
    assert out.dtype == dtype and out.shape == q.shape, why
    assert torch.isfinite(out).all(), f"read outside a context (NaN); {why}"
    ref = paged_attention_reference(q, k_cache, v_cache, meta, scale)
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=0, msg=lambda m: f"vs reference: {m}\n{why}")
    oracle = dense_oracle(q, dense, seqs, scale)
    torch.testing.assert_close(out.double(), oracle, atol=tol, rtol=0, msg=lambda m: f"vs dense: {m}\n{why}")
    torch.testing.assert_close(ref.double(), oracle, atol=tol, rtol=0, msg=lambda m: f"ref vs dense: {m}\n{why}")
    if dtype == torch.float32 and max(c for _, c in seqs) <= 1024:
        padded = padded_gather_attention(q, torch.nan_to_num(k_cache), torch.nan_to_num(v_cache), meta, scale)
        torch.testing.assert_close(out, padded, atol=tol, rtol=0, msg=lambda m: f"vs today's path: {m}\n{why}")


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_thread_counts_and_context_splits_agree(threads: int) -> None:
    """Few sequences with long contexts split each decode row's context over threads; results stay the same."""
    seed = fresh_seed()
    seqs = [(1, 4096), (1, 1100), (3, 700)]
    q, k_cache, v_cache, meta, dense = make_case(seed, seqs, 4, 1, 64, 16, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = paged_attention(q, k_cache, v_cache, meta, 0.125)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out.double(), dense_oracle(q, dense, seqs, 0.125), atol=2e-5, rtol=0,
                               msg=lambda m: f"{m}\nseed={seed} threads={threads}")


def test_bad_metadata_is_refused() -> None:
    with pytest.raises(ValueError, match="query tokens for a context"):
        build_paged_attention_meta([5], [3], [[0]], 16)
    with pytest.raises(ValueError, match="needs 2 blocks; its table has fewer"):
        build_paged_attention_meta([1], [20], [[0, -1]], 16)
    with pytest.raises(ValueError, match="block id 7"):
        build_paged_attention_meta([1], [20], [[0, 7]], 16, num_blocks=4)
    with pytest.raises(ValueError, match="block_size"):
        build_paged_attention_meta([1], [1], [[0]], 0)
    meta = build_paged_attention_meta([1], [20], [[0, 7]], 16)  # unchecked against the cache: the kernel checks
    q, cache = torch.randn(1, 2, 8), torch.randn(4 * 16, 1, 8)
    if att.available():
        with pytest.raises(ValueError, match="outside the cache"):
            paged_attention(q, cache, cache, meta, 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        paged_attention(torch.randn(1, 3, 8), cache.expand(-1, 2, -1), cache.expand(-1, 2, -1), meta, 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        paged_attention(torch.randn(1, 2, 4), cache, cache, meta, 1.0)
    with pytest.raises(ValueError, match="tokens"):
        paged_attention(torch.randn(2, 2, 8), cache, cache, meta, 1.0)


def test_fp16_falls_back_to_reference() -> None:
    seed = fresh_seed()
    seqs = [(3, 40), (1, 17)]
    q, k_cache, v_cache, meta, dense = make_case(seed, seqs, 4, 2, 32, 16, torch.float16)
    out = paged_attention(q, k_cache, v_cache, meta, 0.2)
    torch.testing.assert_close(out, paged_attention_reference(q, k_cache, v_cache, meta, 0.2), msg=f"seed={seed}")


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_dispatcher(mode: str) -> None:
    seed = fresh_seed()
    seqs = [(1, 100), (20, 20), (3, 50)]
    q, k_cache, v_cache, meta, dense = make_case(seed, seqs, 6, 2, 32, 16, torch.float32)
    out = kernels.backend("cpu", mode).paged_attention(q, k_cache, v_cache, meta, 0.3)
    torch.testing.assert_close(out.double(), dense_oracle(q, dense, seqs, 0.3), atol=2e-5, rtol=0,
                               msg=lambda m: f"{m}\nseed={seed} mode={mode}")


def test_chunk_path_without_torch_flash_uses_masked_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch build without the CPU flash op: long chunks take the masked per-sequence SDPA, same result."""
    seed = fresh_seed()
    seqs = [(300, 900), (1, 50), (2048, 2048)]
    q, k_cache, v_cache, meta, dense = make_case(seed, seqs, 6, 2, 32, 16, torch.float32)
    assert meta.flash_seqs == [0, 2], "both long chunks route to the chunk path"
    monkeypatch.setattr(att, "_FLASH", None)
    out = paged_attention(q, k_cache, v_cache, meta, 0.2)
    torch.testing.assert_close(out.double(), dense_oracle(q, dense, seqs, 0.2), atol=2e-5, rtol=0,
                               msg=lambda m: f"{m}\nseed={seed}")
