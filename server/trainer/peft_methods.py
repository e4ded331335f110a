"""PEFT's methods: LoRA on the seven projections (no bias; QLoRA on an NF4 base; DoRA with use_dora, served by the
DORA kind), prompt / P-tuning / prefix virtual tokens, IA3 on k/v/down_proj. Each is a PEFT config on the frozen
base (get_peft_model); PEFT's save_pretrained writes what the server reads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
)
from torch import nn

from server.trainer.config import TrainConfig
from server.trainer.methods import MethodDefaults, TrainingMethod, check_targets, register

IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)


def lora_config(cfg: TrainConfig, *, dora: bool = False) -> LoraConfig:
    targets = tuple(cfg.resolved("targets"))
    check_targets(targets, "LoRA")
    return LoraConfig(r=cfg.resolved("rank"), lora_alpha=cfg.resolved("alpha"), target_modules=list(targets),
                      lora_dropout=0.0, bias="none", use_dora=dora, task_type="CAUSAL_LM")


def prompt_config(cfg: TrainConfig) -> PeftConfig:
    # initialised from embeddings of random vocabulary tokens: on the scale the model expects
    return PromptTuningConfig(num_virtual_tokens=cfg.resolved("virtual_tokens"),
                              prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB, task_type="CAUSAL_LM")


def p_tuning_config(cfg: TrainConfig) -> PeftConfig:
    return PromptEncoderConfig(num_virtual_tokens=cfg.resolved("virtual_tokens"),
                               encoder_hidden_size=cfg.resolved("encoder_hidden"), task_type="CAUSAL_LM")


def prefix_config(cfg: TrainConfig) -> PeftConfig:
    return PrefixTuningConfig(num_virtual_tokens=cfg.resolved("virtual_tokens"), task_type="CAUSAL_LM")


def ia3_config(cfg: TrainConfig) -> PeftConfig:
    targets = tuple(cfg.resolved("targets"))
    feedforward = [t for t in targets if t in IA3_FEEDFORWARD]
    return IA3Config(target_modules=list(targets), feedforward_modules=feedforward, task_type="CAUSAL_LM")


@torch.no_grad()
def init_prefix_from_base(peft_model, seed: int) -> None:
    """Start a prefix-tuning adapter from the base model's own keys and values for random vocabulary tokens.

    PEFT initialises the prefix from N(0, 1), far off the scale of a model's K/V; this mirrors prompt tuning's
    SAMPLE_VOCAB init. Layout (PEFT's): row n holds, for each layer l, the keys (entry 2l) then the values
    (entry 2l+1), each [kv_heads, head_dim].
    """
    table = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight  # [n, layers*2*kv*hd]
    base = peft_model.get_base_model()
    n = table.shape[0]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, base.config.vocab_size, (1, n), generator=g).to(table.device)
    cache = base(input_ids=ids, use_cache=True).past_key_values
    per_layer = []
    for layer in cache.layers:  # keys / values: [1, kv_heads, n, head_dim]
        per_layer += [layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)]  # [n, kv_heads, head_dim]
    table.copy_(torch.stack(per_layer, dim=1).reshape(n, -1).to(table.dtype))


def peft_method(name: str, defaults: MethodDefaults, config: Callable[[TrainConfig], PeftConfig], *,
                plain: bool = True, after: Callable[[nn.Module, int], None] | None = None) -> TrainingMethod:
    """A method that is get_peft_model on `config(cfg)`, the adapter initialised from the run's seed."""

    def build(cfg: TrainConfig, base: nn.Module, model_dir: Path) -> nn.Module:
        peft_cfg = config(cfg)
        torch.manual_seed(cfg.seed)  # adapter initialisation
        model = get_peft_model(base, peft_cfg)
        if after is not None:
            after(model, cfg.seed)
        return model

    return TrainingMethod(name, defaults, build, plain_peft=plain)


register(peft_method("lora", MethodDefaults(lr=1e-3, steps=30), lora_config))
register(peft_method("qlora", MethodDefaults(lr=1e-3, steps=30, quantized_base=True), lora_config))
register(peft_method("prompt", MethodDefaults(lr=3e-2, steps=80), prompt_config))
register(peft_method("p_tuning", MethodDefaults(lr=3e-3, steps=80), p_tuning_config))
register(peft_method("prefix", MethodDefaults(lr=1e-2, steps=80), prefix_config, after=init_prefix_from_base))
register(peft_method("ia3", MethodDefaults(lr=3e-2, steps=80, targets=IA3_TARGETS), ia3_config))
# PEFT loads it, but the server serves it as DORA (peft_type LORA + use_dora): held to the DoRA kind's oracle
register(peft_method("dora", MethodDefaults(lr=1e-3, steps=30), lambda cfg: lora_config(cfg, dora=True),
                     plain=False))
