"""Helpers to run our model on whole sequences (logits of every token), for oracle comparisons."""

from __future__ import annotations

from pathlib import Path

import torch

from kernels.attention import build_paged_attention_meta
from server.config import ModelConfig
from server.engine.kv_cache import KVCache
from server.model.batch import AttentionMeta, ForwardBatch
from server.model.loader import LoadedModel, load_model


def single_sequence_batch(n: int) -> ForwardBatch:
    """A prefill of one sequence of n tokens at KV slots 0..n-1 (input_ids filled in by the caller)."""
    idx = torch.arange(n)
    blocks = list(range(-(-n // 16)))  # our_logits' cache: block_size 16, block b holds slots 16b..16b+15
    attn = AttentionMeta(kv_write_slots=idx, paged=build_paged_attention_meta([n], [n], [blocks], 16))
    return ForwardBatch(input_ids=idx, positions=idx, attention=attn, logits_index=idx[-1:])


def our_logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """Logits [n, vocab] fp32 of our model for one sequence."""
    batch = single_sequence_batch(len(ids))
    batch.input_ids = torch.tensor(ids)
    kv = KVCache(loaded.args, num_blocks=-(-len(ids) // 16), block_size=16, dtype=loaded.model.dtype, device="cpu")
    return loaded.model(batch, kv.k, kv.v, all_logits=True)


def load(path: Path, quantize: bool) -> LoadedModel:
    return load_model(ModelConfig(path=str(path), quantize=quantize))
