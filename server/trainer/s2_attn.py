"""Shifted sparse attention (S2-Attn, LongLoRA, Chen et al. 2023), registered with transformers' AttentionInterface
as "longlora_s2": grouped causal attention while the attention module is in training mode, full causal attention in
eval mode (evaluation, serving).

Groups of a quarter of the training context (attach_longlora sets `s2_group_size` = --max-length // 4 on the
model's config; a batch shorter than that is padded to whole groups), without wrap-around, as the LongLoRA authors'
later flash-attention code partitions them (their issue #90): the paper's pseudo-code rolls half the heads by half a
group, so that group's first tokens sit after the sequence's last ones and attend to them, the future. Measured on the
topic task (default model, 30 steps, default settings; exact-match): roll with groups of a quarter of each batch
(20-token rows: groups of 5) 39.6%; no wrap-around, same groups 56.2%; no wrap-around, groups of --max-length // 4
100.0%, as with full attention.

Layout: each head range is copied once (kv heads repeated in the same copy) into a [B, groups * G, heads, D] buffer
whose [B * groups, heads, G, D] view is what SDPA reads, so the CPU flash kernel (4-D inputs) runs, saving only its
inputs, output and log-sum-exp for backward; one more copy writes the output back in token order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

S2_ATTENTION = "longlora_s2"
GROUPS = 4  # S2-Attn group size = a quarter of the context
GROUP_ATTR = "s2_group_size"  # set on the model's config by attach_longlora: a quarter of the training context


def _head_runs(h: int, rep: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(first query head, end, source head) for query heads lo..hi-1: runs reading one slice of the source heads
    (rep = query heads per kv head; rep 1: the whole range is one run)."""
    if rep == 1:
        return [(lo, hi, lo)] if hi > lo else []
    return [(a, min(hi, (j + 1) * rep), j) for j in range(lo // rep, -(-hi // rep))
            for a in [max(lo, j * rep)] if a < min(hi, (j + 1) * rep)]


def _gather(x: torch.Tensor, h: int, lo: int, hi: int, spans: list[tuple[int, int, int]], length: int,
            ) -> torch.Tensor:
    """Heads lo..hi-1 of x [B, KV, T, D] (kv heads repeated to h) -> buffer [B, length, hi - lo, D], where span
    (start, end, dst) puts tokens start..end-1 at dst..; every other row is zero."""
    b, kv, _, d = x.shape
    rep = h // kv
    buf = x.new_zeros(b, length, hi - lo, d)
    heads = buf.transpose(1, 2)  # [B, hi - lo, length, D] view
    for a, e, src in _head_runs(h, rep, lo, hi):
        part = x[:, a:e] if rep == 1 else x[:, src : src + 1].expand(-1, e - a, -1, -1)
        for start, end, dst in spans:
            if end > start:
                heads[:, a - lo : e - lo, dst : dst + end - start] = part[:, :, start:end]
    return buf


def _grouped(buf: torch.Tensor, n_groups: int) -> torch.Tensor:
    """buf [B, n_groups * G, heads, D] -> its view [B * n_groups, heads, G, D] (one group per batch row)."""
    b, length, h, d = buf.shape
    group = length // n_groups
    return buf.view(b, n_groups, group, h, d).transpose(2, 3).reshape(b * n_groups, h, group, d)


def s2_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 **kwargs) -> tuple[torch.Tensor, None]:
    """Semantics: query [B, H, T, D], key / value [B, KV, T, D] (RoPE applied) -> out [B, T, H, D].

    Training mode: G = the model config's `s2_group_size` (a quarter of the training context), or without it a
    quarter of T rounded up to a multiple of 4; s = G // 2. Query i of heads 0..H/2-1 attends causally to keys j <= i
    of its group [kG, (k+1)G); query i of heads H/2.. to keys j <= i of its group among [0, s), [s + kG, s + (k+1)G)
    (the last one cut at T); a row shorter than s sees full causal attention. No query sees a later key; right
    padding of the batch is ignored as full causal attention ignores it for the real tokens. Eval mode: full causal
    attention (`attention_mask` honoured)."""
    b, h, t, d = query.shape
    if not module.training:
        rep = h // key.shape[1]
        key = key.repeat_interleave(rep, dim=1) if rep > 1 else key
        value = value.repeat_interleave(rep, dim=1) if rep > 1 else value
        mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None and t > 1,
                                             scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    group = getattr(getattr(module, "config", None), GROUP_ATTR, None) or -(-t // GROUPS)
    n_groups = -(-t // group)  # T padded to n_groups * G
    s = group // 2
    out = query.new_empty(b, t, h, d)
    # (heads, token spans into the buffer, groups): unshifted n_groups; shifted [0, s) alone, then whole groups
    layouts = [(0, h // 2, [(0, t, 0)], n_groups), (h // 2, h, [(0, min(s, t), 0), (s, t, group)], n_groups + 1)]
    for lo, hi, spans, groups in layouts:
        if hi == lo:
            continue
        q, k, v = (_grouped(_gather(x, h, lo, hi, spans, groups * group), groups) for x in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)  # [B * groups, heads, G, D]
        o = o.transpose(1, 2).reshape(b, groups * group, hi - lo, d)  # a view of SDPA's [B*groups, G, heads, D]
        for start, end, dst in spans:
            if end > start:
                out[:, start:end, lo:hi] = o[:, dst : dst + end - start]
    return out, None


AttentionInterface.register(S2_ATTENTION, s2_attention)
