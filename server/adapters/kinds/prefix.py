"""Prefix tuning: learned K/V placed before a sequence's cache in every layer, with no RoPE (as in PEFT).

PEFT key `prompt_embeddings` [n_virtual, layers*2*kv_heads*head_dim] viewed as [n, layers*2, kv_heads,
head_dim]: layer l's keys are entry 2l and values 2l+1. The engine writes them at context entries
0..n-1 when the sequence is admitted; attention then reads them like any cached entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.adapters.kinds.base import AdapterKind, AdapterLimits, BaseModelMismatch, ContextLayout
from server.adapters.kinds.virtual import check_prompt_embeddings_header, prompt_embeddings
from server.model.args import ModelArgs


@dataclass(slots=True)
class PrefixWeights:
    keys: torch.Tensor  # [layers, n_virtual, kv_heads, head_dim]
    values: torch.Tensor  # [layers, n_virtual, kv_heads, head_dim]


class PrefixKind(AdapterKind):
    name = "PREFIX_TUNING"
    peft_types = ("PREFIX_TUNING",)

    def read(self, cfg: dict, tensors: dict[str, torch.Tensor], args: ModelArgs, limits: AdapterLimits
             ) -> PrefixWeights:
        emb = prompt_embeddings(cfg, tensors, limits.max_virtual_tokens)
        width = args.num_layers * 2 * args.num_kv_heads * args.head_dim
        if emb.shape[1] != width:
            raise BaseModelMismatch(
                f"prefix width {emb.shape[1]} != layers*2*kv_heads*head_dim = {width} of the base "
                f"({args.num_layers}*2*{args.num_kv_heads}*{args.head_dim})"
            )
        kv = emb.view(emb.shape[0], args.num_layers * 2, args.num_kv_heads, args.head_dim)
        keys = kv[:, 0::2].permute(1, 0, 2, 3).contiguous()  # [layers, n, kv_heads, head_dim]
        values = kv[:, 1::2].permute(1, 0, 2, 3).contiguous()
        return PrefixWeights(keys=keys, values=values)

    def check_tensor_header(self, key: str, shape: tuple[int, ...], args: ModelArgs, limits: AdapterLimits) -> bool:
        return check_prompt_embeddings_header(key, shape, args, limits)

    def tensors(self, payload: PrefixWeights) -> list[torch.Tensor]:
        return [payload.keys, payload.values]

    def describe(self, payload: PrefixWeights) -> dict:
        return {"rank": 0, "target_modules": [], "num_virtual_tokens": int(payload.keys.shape[1])}

    def layout(self, num_virtual_tokens: int) -> ContextLayout:
        return ContextLayout(n_prefix=num_virtual_tokens)

    def cached_prefix(self, payload: PrefixWeights) -> tuple[torch.Tensor, torch.Tensor]:
        return payload.keys, payload.values
