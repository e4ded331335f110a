"""LongLoRA training (Chen et al. 2023): LoRA + trainable embeddings and norms, at a context extended by RoPE linear
position interpolation, with shifted sparse attention (S2-Attn) while training only.

- RoPE: the base's rotary embedding is rebuilt by transformers at rope_type "linear" with the run's factor; the
  factor is written into the saved adapter_config.json as `rope_scaling` (served by server/adapters/kinds/longlora.py)
- trainable: LoRA on the targeted projections + PEFT `modules_to_save` embed_tokens, input_layernorm,
  post_attention_layernorm, norm
- S2-Attn (`s2_attention`, registered with transformers' AttentionInterface as "longlora_s2"): while the attention
  module is in training mode the context is cut into 4 groups (a quarter each); half the heads see groups shifted by
  half a group, so information flows between neighbouring groups; each group attends causally within itself. In
  eval mode (evaluation, serving) it is full causal attention.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AttentionInterface

from server.adapters.kinds.longlora import SAVED_MODULES
from server.trainer.hooked import HookedModel
from server.trainer.methods import check_targets

S2_ATTENTION = "longlora_s2"
GROUPS = 4  # S2-Attn group size = a quarter of the context


def s2_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 **kwargs) -> tuple[torch.Tensor, None]:
    """Semantics: query [B, H, T, D], key / value [B, KV, T, D] (RoPE applied) -> out [B, T, H, D].

    Training mode: T padded to a multiple of 4 (zero keys at the end, never seen causally except through the
    shift's wrap-around), group size G = T / 4; heads H/2.. rolled by -G/2 along T; causal attention within each
    group; those heads rolled back. Right padding of the batch is ignored as full causal attention ignores it for
    the real tokens (their loss never reads later positions). Eval mode: full causal attention (`attention_mask`
    honoured)."""
    b, h, t, d = query.shape
    rep = h // key.shape[1]
    key = key.repeat_interleave(rep, dim=1) if rep > 1 else key
    value = value.repeat_interleave(rep, dim=1) if rep > 1 else value
    if not module.training:
        mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None and t > 1,
                                             scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    pad = (-t) % GROUPS
    if pad:
        query, key, value = (F.pad(x, (0, 0, 0, pad)) for x in (query, key, value))
    n = t + pad
    group = n // GROUPS
    shift = group // 2

    def rolled(x: torch.Tensor, by: int) -> torch.Tensor:
        return torch.cat((x[:, : h // 2], x[:, h // 2 :].roll(by, dims=2)), dim=1)

    q, k, v = (rolled(x, -shift).reshape(b, h, GROUPS, group, d) for x in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)  # [B, H, 4, G, D]
    out = rolled(out.reshape(b, h, n, d), shift)[:, :, :t]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(S2_ATTENTION, s2_attention)


def set_linear_rope(base: nn.Module, factor: float) -> None:
    """Rebuild the base's rotary embedding with transformers' own rope_type "linear" at `factor`."""
    cfg = copy.deepcopy(base.config)
    cfg.rope_parameters = {"rope_type": "linear", "factor": float(factor),
                           "rope_theta": base.config.rope_parameters["rope_theta"]}
    base.config.rope_parameters = cfg.rope_parameters
    inner = base.model
    inner.rotary_emb = type(inner.rotary_emb)(config=cfg).to(inner.embed_tokens.weight.device)


class LongLoraModel(HookedModel):
    """The PEFT model, saved with the RoPE factor recorded in its adapter_config.json."""

    def __init__(self, peft_model: nn.Module, factor: float) -> None:
        super().__init__()
        self.base = peft_model
        self.factor = factor

    def save_pretrained(self, out: Path, safe_serialization: bool = True) -> None:
        self.base.save_pretrained(out, safe_serialization=safe_serialization)
        path = Path(out) / "adapter_config.json"
        cfg = json.loads(path.read_text())
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": self.factor}
        path.write_text(json.dumps(cfg, indent=1))


def attach_longlora(base: nn.Module, *, rank: int, alpha: float, targets: tuple[str, ...], factor: float,
                    s2_attn: bool = True) -> LongLoraModel:
    """LoRA + trainable embeddings and norms on `base`, its RoPE interpolated by `factor`, S2-Attn when training."""
    check_targets(targets, "LongLoRA")
    if factor < 1.0:
        raise ValueError(f"the RoPE interpolation factor must be >= 1, got {factor}")
    set_linear_rope(base, factor)
    if s2_attn:
        base.set_attn_implementation(S2_ATTENTION)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), modules_to_save=list(SAVED_MODULES),
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return LongLoraModel(get_peft_model(base, cfg), factor)
