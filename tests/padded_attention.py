"""A second, independent attention oracle for tests/test_paged_attention.py: every context gathered into a padded
[B, kv_max] batch and masked, the way the model computed attention before the paged kernel (kernels/attention.py).
It shares no code with the kernel or its torch reference beyond the metadata builder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.attention import PagedAttentionMeta, context_slots


def padded_gather_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedAttentionMeta,
                            scale: float) -> torch.Tensor:
    """q [T, H, D], k_cache/v_cache [kv_slots, KVH, D] -> out [T, H, D] fp32 (q's math in fp32, as the model)."""
    q_lens = torch.tensor([meta.q_starts_list[b + 1] - meta.q_starts_list[b] for b in range(meta.num_seqs)])
    rows = [context_slots(meta, b) for b in range(meta.num_seqs)]
    kv_max, q_max = max(r.shape[0] for r in rows), int(q_lens.max())
    kv_slots = torch.zeros(meta.num_seqs, kv_max, dtype=torch.int64)
    for i, row in enumerate(rows):
        kv_slots[i, : row.shape[0]] = row
    j = torch.arange(q_max)
    valid = j[None, :] < q_lens[:, None]  # [B, q_max]
    index = torch.where(valid, (torch.cumsum(q_lens, 0) - q_lens)[:, None] + j[None, :], 0)
    q_pos = torch.where(valid, (meta.context_lens - q_lens)[:, None] + j[None, :], 0)
    mask = (torch.arange(kv_max)[None, None, :] <= q_pos[:, :, None])[:, None]  # [B, 1, q_max, kv_max]
    keys = k_cache[kv_slots].transpose(1, 2).float()  # [B, KVH, kv_max, D]
    values = v_cache[kv_slots].transpose(1, 2).float()
    out = F.scaled_dot_product_attention(q.float()[index].transpose(1, 2), keys, values, attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k_cache.shape[1])
    return out.transpose(1, 2)[valid]
