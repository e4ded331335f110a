"""Oracle side of LongLoRA: adapters made by PEFT (LoRA + modules_to_save) with random non-zero weights, the
interpolation factor recorded in adapter_config.json, and transformers' model with rope_type "linear" at that
factor + PeftModel as the oracle."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

ALL_SAVED = ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"]


def make_longlora_adapter(base_dir: Path, out: Path, *, rank: int, alpha: float, targets: list[str], seed: int,
                          factor: float | None, saved: list[str] | None = None) -> Path:
    """PEFT's LoRA with `saved` as modules_to_save, every trainable tensor randomized (norm weights and embedding
    rows moved off the base's: far enough to change every logit, near enough that a 30-layer base does not turn
    chaotic, where fp32 itself drifts from fp64 by whole logits), then `rope_scaling`
    {"rope_type": "linear", "factor": factor} written next to it."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    saved = ALL_SAVED if saved is None else saved
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, modules_to_save=saved or None,
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "norm" in name:  # the base's weights, each scaled by ~N(1, 0.1) (as training moves them)
                p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:  # the embedding table: the base's plus noise of ~half its spread
                p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    if factor is not None:
        config = json.loads((out / "adapter_config.json").read_text())
        config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
        (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def with_linear_rope(base: torch.nn.Module, factor: float) -> torch.nn.Module:
    """A copy of transformers' model whose rotary embedding is transformers' own at rope_type "linear"."""
    model = copy.deepcopy(base)
    cfg = copy.deepcopy(model.config)
    theta = cfg.rope_parameters["rope_theta"]
    cfg.rope_parameters = {"rope_type": "linear", "factor": float(factor), "rope_theta": theta}
    model.config = cfg
    model.model.config = cfg
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    return model


def longlora_logits(base: torch.nn.Module, adapter_dir: Path, ids: list[int]) -> torch.Tensor:
    """PeftModel's logits [len(ids), vocab] on transformers' model at the adapter's RoPE factor."""
    scaling = json.loads((adapter_dir / "adapter_config.json").read_text()).get("rope_scaling")
    model = with_linear_rope(base, scaling["factor"]) if scaling else copy.deepcopy(base)
    dtype = next(base.parameters()).dtype  # float64 when the caller measures the fp32 oracle's own rounding
    model = PeftModel.from_pretrained(model, adapter_dir).eval().to(dtype)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
    return logits[0].float()
