"""Paged attention: a step's query tokens against each sequence's context, read in place from the paged KV cache.

Semantics (both paths): sequence b owns query tokens q[q_starts[b]:q_starts[b+1]] (q_len_b of them, flat,
sequence after sequence) and a context of context_lens[b] tokens (including this step's), whose index i lives
at cache slot block_tables[b, i // block_size] * block_size + i % block_size. Query row j of sequence b sits at
context index p = context_lens[b] - q_len_b + j and attends causally to context indices 0..p:

    out[t, h] = sum_i softmax_i(scale * q[t, h] . K[slot(i), h // group]) V[slot(i), h // group],  i <= p

with group = heads / kv_heads (GQA: query head h reads kv head h // group, as HF's repeat_kv), fp32
softmax and accumulation, out in q's dtype. Context indices 0..n_prefix-1 may hold prefix-tuning K/V: they
are ordinary context. `paged_attention_reference` is the oracle (per sequence: gather its context, SDPA);
`paged_attention_kernel` is the compiled CPU kernel (kernels/csrc/attention.cpp: online softmax over the block table,
parallel over (sequence, kv head, query block), decode contexts split across threads when there are few
sequences) for decode rows and short chunks; a long prefill chunk (`takes_flash`) goes to torch's CPU flash
kernel over its own gathered context, causal over the chunk and unmasked over its past, merged by log-sum-exp
(a prefill costs what its sequence costs, with GEMM tiles, measured faster there). The kernel returns None for
what it cannot take (CUDA tensors, fp16), and kernels/backend.py runs the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.build import extension

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# Which prefill chunks take torch's flash kernel (`takes_flash`), measured per (rows, past) on 1 and 2 threads,
# 9/3 heads of 64: the compiled kernel wins below 64 rows at any past, and up to 1,024 rows with no past (it
# skips the causal half row by row, ~0.6-0.9x flash's time); flash's GEMM tiles win for 2,048 rows and for
# chunks whose past is at least half their length (1.1-1.5x). FLASH_MIN_Q = 0: never (the kernel takes all).
FLASH_MIN_Q = 64
FLASH_ALWAYS_Q = 2048
# torch's CPU flash attention returning (out, logsumexp), GQA-aware; absent from some torch builds: masked SDPA then
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def takes_flash(q_len: int, past: int) -> bool:
    """True when a chunk of q_len query rows over `past` earlier context entries runs the flash path."""
    return 0 < FLASH_MIN_Q <= q_len and (q_len >= FLASH_ALWAYS_Q or 2 * past >= q_len)


@dataclass(slots=True)
class PagedAttentionMeta:
    q_starts: torch.Tensor  # [B + 1] int64, host: sequence b's query tokens are q[q_starts[b]:q_starts[b+1]]
    context_lens: torch.Tensor  # [B] int64, host: kv length of each sequence, this step's tokens included
    block_tables: torch.Tensor  # [B, max_blocks] int32, host: cache block of each context block, -1 = none
    block_size: int
    q_starts_list: list[int]  # the same, as host lists (the reference loops over sequences without syncs)
    context_lens_list: list[int]
    flash_seqs: list[int]  # sequences whose chunk takes the flash path (takes_flash), the compiled kernel skips them
    skip: torch.Tensor | None  # [B] uint8, host: 1 for those sequences (None when there are none)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_list)

    @property
    def num_tokens(self) -> int:
        return self.q_starts_list[-1]


def build_paged_attention_meta(q_lens: Sequence[int], context_lens: Sequence[int],
                               block_tables: Sequence[Sequence[int]] | torch.Tensor, block_size: int,
                               num_blocks: int | None = None) -> PagedAttentionMeta:
    """Checked metadata for one step (built once per step on the host, shared by every layer).

    Raises ValueError on a query longer than its context, a context its block table does not cover, or (given
    num_blocks, the cache's block count) a block id outside the cache."""
    if block_size <= 0 or block_size > 1024:
        raise ValueError(f"block_size must be in 1..1024, got {block_size}")
    if len(q_lens) != len(context_lens):
        raise ValueError(f"{len(q_lens)} query lengths for {len(context_lens)} contexts")
    tables = torch.as_tensor(block_tables, dtype=torch.int32).reshape(len(q_lens), -1).contiguous()
    q = torch.as_tensor(list(q_lens), dtype=torch.int64)
    ctx = torch.as_tensor(list(context_lens), dtype=torch.int64)
    bad = torch.nonzero((q < 0) | (ctx < q)).flatten()
    if bad.numel():
        b = int(bad[0])
        raise ValueError(f"sequence {b}: {int(q[b])} query tokens for a context of {int(ctx[b])}")
    needed = (ctx + block_size - 1) // block_size  # [B] blocks each context spans
    short = torch.nonzero(needed > tables.shape[1]).flatten()
    in_use = torch.arange(tables.shape[1])[None, :] < needed[:, None]  # [B, max_blocks]
    missing = torch.nonzero((in_use & (tables < 0)).any(1)).flatten()
    if short.numel() or missing.numel():
        b = int(torch.cat([short, missing]).min())
        raise ValueError(f"sequence {b}: context {int(ctx[b])} needs {int(needed[b])} blocks; its table has fewer")
    if num_blocks is not None:
        outside = in_use & (tables >= num_blocks)
        if outside.any():
            b = int(torch.nonzero(outside.any(1)).flatten()[0])
            raise ValueError(f"sequence {b}: block id {int(tables[b][in_use[b]].max())} >= {num_blocks} blocks")
    starts = torch.zeros(len(q_lens) + 1, dtype=torch.int64)
    torch.cumsum(q, 0, out=starts[1:])
    ctx_list = ctx.tolist()
    flash = [b for b, (n, c) in enumerate(zip(q_lens, ctx_list, strict=True)) if takes_flash(n, c - n)]
    skip = None
    if flash:
        skip = torch.zeros(len(q_lens), dtype=torch.uint8)
        skip[flash] = 1
    return PagedAttentionMeta(
        q_starts=starts,
        context_lens=ctx,
        block_tables=tables,
        block_size=block_size,
        q_starts_list=starts.tolist(),
        context_lens_list=ctx_list,
        flash_seqs=flash,
        skip=skip,
    )


def context_slots(meta: PagedAttentionMeta, b: int) -> torch.Tensor:
    """[context_len] int64 cache slots of sequence b's context, in context order."""
    i = torch.arange(meta.context_lens_list[b])
    return meta.block_tables[b, i // meta.block_size].long() * meta.block_size + i % meta.block_size


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: PagedAttentionMeta, scale: float) -> torch.Tensor:
    """The oracle: per sequence, gather its context through the block table and run causal SDPA in fp32.

    q [T, H, D], k_cache/v_cache [kv_slots, KVH, D] (one layer), returns out [T, H, D] in q's dtype."""
    out = torch.empty_like(q)
    for b in range(meta.num_seqs):
        _sequence_sdpa(q, k_cache, v_cache, meta, scale, b, out)
    return out


def _sequence_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedAttentionMeta,
                   scale: float, b: int, out: torch.Tensor) -> None:
    """out[sequence b's rows] = causal SDPA (fp32) of its queries over its own context, gathered from the cache."""
    lo, hi = meta.q_starts_list[b], meta.q_starts_list[b + 1]
    if hi == lo:
        return
    slots = context_slots(meta, b).to(k_cache.device)
    keys = k_cache[slots].float().transpose(0, 1)[None]  # [1, KVH, ctx, D] (4-D: torch's fused CPU kernel)
    values = v_cache[slots].float().transpose(0, 1)[None]
    ctx = slots.shape[0]
    pos = torch.arange(ctx - (hi - lo), ctx, device=q.device)
    mask = torch.arange(ctx, device=q.device)[None, :] <= pos[:, None]  # [q_len, ctx]
    o = F.scaled_dot_product_attention(q[lo:hi].float().transpose(0, 1)[None], keys, values, attn_mask=mask,
                                       scale=scale, enable_gqa=q.shape[1] != k_cache.shape[1])
    out[lo:hi] = o[0].transpose(0, 1).to(q.dtype)


def _chunk_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedAttentionMeta,
                     scale: float, b: int, out: torch.Tensor) -> None:
    """out[sequence b's rows] = the same as _sequence_sdpa, through torch's CPU flash kernel without a dense mask.

    A chunk of q_len rows whose context holds `past = ctx - q_len` earlier entries is two flash calls: the rows
    against the past (no mask: every past entry is visible to every row) and against the chunk itself (top-left
    causal, which the kernel skips block-wise), merged by their log-sum-exps. About half the work of one masked
    call over the whole context when past = 0, three quarters when past = q_len."""
    if _FLASH is None:
        _sequence_sdpa(q, k_cache, v_cache, meta, scale, b, out)
        return
    lo, hi = meta.q_starts_list[b], meta.q_starts_list[b + 1]
    q_len, ctx = hi - lo, meta.context_lens_list[b]
    slots = context_slots(meta, b)
    keys = k_cache[slots].float().transpose(0, 1)[None]  # [1, KVH, ctx, D]
    values = v_cache[slots].float().transpose(0, 1)[None]
    query = q[lo:hi].float().transpose(0, 1)[None]  # [1, H, q_len, D]
    past = ctx - q_len
    o_new, lse_new = _FLASH(query, keys[:, :, past:], values[:, :, past:], is_causal=True, scale=scale)
    if past > 0:
        o_old, lse_old = _FLASH(query, keys[:, :, :past], values[:, :, :past], scale=scale)
        # the past's share of each row's softmax mass: e^lse_old / (e^lse_old + e^lse_new), [1, H, q_len, 1]
        share = torch.sigmoid(lse_old - lse_new)[..., None]
        o_new = torch.lerp(o_new, o_old, share)  # one pass: o_new + share * (o_old - o_new)
    out[lo:hi] = o_new[0].transpose(0, 1).to(q.dtype)


def _kernels():
    return extension("attention")  # built once, then cached (kernels/build.py)


def available() -> bool:
    """True when the compiled kernel is usable on this machine (builds it on first call)."""
    return _kernels() is not None


def check_shapes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedAttentionMeta) -> None:
    """Raises ValueError on q [T, H, D], caches [kv_slots, KVH, D] and metadata that do not fit together."""
    t, heads, dim = q.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[2] != dim or heads % k_cache.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} does not fit k {tuple(k_cache.shape)} / v {tuple(v_cache.shape)}")
    if t != meta.num_tokens:
        raise ValueError(f"q has {t} tokens, the metadata {meta.num_tokens}")


def paged_attention_checked_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      meta: PagedAttentionMeta, scale: float) -> torch.Tensor:
    """paged_attention_reference after the kernel's shape checks (the torch backend's op)."""
    check_shapes(q, k_cache, v_cache, meta)
    return paged_attention_reference(q, k_cache, v_cache, meta, scale)


def paged_attention_kernel(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedAttentionMeta,
                           scale: float) -> torch.Tensor | None:
    """Semantics: out[t, h] = sum_{i <= p(t)} softmax_i(scale * q[t, h] . K[slot_b(i), h // group]) V[slot_b(i), ...]
    for query token t of sequence b at context index p(t) = context_lens[b] - q_len_b + (t - q_starts[b]), where
    slot_b(i) = block_tables[b, i // block_size] * block_size + i % block_size (fp32 softmax and accumulation).

    q [T, H, D] fp32/bf16, k_cache/v_cache [kv_slots, KVH, D] fp32/bf16 (one layer, same dtype),
    returns out [T, H, D] in q's dtype, or None when the kernel cannot take these tensors. Raises ValueError on
    shapes that do not fit together."""
    check_shapes(q, k_cache, v_cache, meta)
    t, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    lib = _kernels()
    tensors = (q, k_cache, v_cache)
    if (lib is None or any(x.dtype not in _DTYPES or x.stride(-1) != 1 or x.is_cuda for x in tensors)
            or k_cache.dtype != v_cache.dtype):
        return None
    out = torch.empty_like(q)
    if t == 0:
        return out
    tables = meta.block_tables
    n = lib.attention(q.data_ptr(), q.stride(0), q.stride(1), _DTYPES[q.dtype],
                      k_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
                      v_cache.data_ptr(), v_cache.stride(0), v_cache.stride(1), _DTYPES[k_cache.dtype],
                      k_cache.shape[0], out.data_ptr(), out.stride(0), out.stride(1),
                      meta.q_starts.data_ptr(), meta.context_lens.data_ptr(), tables.data_ptr(), tables.stride(0),
                      meta.num_seqs, meta.block_size, heads, kv_heads, dim, float(scale),
                      0 if meta.skip is None else meta.skip.data_ptr(), torch.get_num_threads())
    if n < 0:
        raise ValueError(f"a block table entry lies outside the cache ({k_cache.shape[0]} slots)")
    for b in meta.flash_seqs:  # long prefill chunks: torch's flash kernel over the sequence's own context
        _chunk_attention(q, k_cache, v_cache, meta, scale, b, out)
    return out
