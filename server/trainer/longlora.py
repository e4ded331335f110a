"""LongLoRA training (Chen et al. 2023): LoRA + trainable embeddings and norms, at a context extended by RoPE linear
position interpolation, with shifted sparse attention (S2-Attn) while training only.

- RoPE: the base's rotary embedding is rebuilt by transformers at rope_type "linear" with the run's factor; the
  factor is written into the saved adapter_config.json as `rope_scaling` (served by server/adapters/kinds/longlora.py)
- trainable: LoRA on the targeted projections + PEFT `modules_to_save` embed_tokens, input_layernorm,
  post_attention_layernorm, norm
- S2-Attn (server/trainer/s2_attn.py, registered with transformers' AttentionInterface as "longlora_s2"): while the
  attention module is in training mode the context is cut into 4 groups (a quarter each); half the heads see groups
  offset by half a group, so information flows between neighbouring groups; each group attends causally within
  itself. In eval mode (evaluation, serving) it is full causal attention.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from server.adapters.kinds.longlora import SAVED_MODULES
from server.trainer.config import TrainConfig
from server.trainer.hooked import HookedModel
from server.trainer.methods import MethodDefaults, TrainingMethod, check_targets, register
from server.trainer.s2_attn import GROUP_ATTR, GROUPS, S2_ATTENTION


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
                    context: int, s2_attn: bool = True) -> LongLoraModel:
    """LoRA + trainable embeddings and norms on `base`, its RoPE interpolated by `factor`, S2-Attn when training
    with groups of a quarter of `context` (the training context: rows are at most this long)."""
    check_targets(targets, "LongLoRA")
    if factor < 1.0:
        raise ValueError(f"the RoPE interpolation factor must be >= 1, got {factor}")
    set_linear_rope(base, factor)
    if s2_attn:
        setattr(base.config, GROUP_ATTR, max(1, context // GROUPS))
        base.set_attn_implementation(S2_ATTENTION)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), modules_to_save=list(SAVED_MODULES),
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return LongLoraModel(get_peft_model(base, cfg), factor)


def _build(cfg: TrainConfig, base: nn.Module, model_dir: Path) -> LongLoraModel:
    torch.manual_seed(cfg.seed)
    return attach_longlora(base, rank=cfg.resolved("rank"), alpha=cfg.resolved("alpha"),
                           targets=tuple(cfg.resolved("targets")), factor=cfg.rope_factor, context=cfg.max_length,
                           s2_attn=cfg.s2_attn)


# embeddings and norms at a tenth of the LoRA rate (arithmetic task, exact-match 56.2% vs 45.8% at 1e-3; topic 100%
# at 1e-3 and 1e-4, 95.8% at 1e-5; measured with bench/methods.py settings)
register(TrainingMethod("longlora", MethodDefaults(lr=1e-3, steps=30, embed_norm_lr=1e-4), _build))
