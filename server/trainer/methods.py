"""The tuning methods: per-method default hyper-parameters and the PEFT config each one trains.

Every method writes an adapter our server reads unchanged (server/adapters/peft_format.py): LoRA on the
seven projections (no bias, no DoRA), prompt / P-tuning / prefix virtual tokens, IA3 on k/v/down_proj.
KIND_METHODS are served by kinds beyond PEFT's own loading: DoRA (a PEFT LoRA directory with use_dora, served
by the DORA kind), BitFit (our BITFIT format, server/trainer/bitfit.py) and bottleneck adapters (AdapterHub's
layout, server/trainer/bottleneck.py); the last two are not PEFT methods. LongLoRA (server/trainer/longlora.py) is
a PEFT LoRA with modules_to_save and a RoPE factor, served by the LONGLORA kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
)

from server.model.args import PROJECTIONS

IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)


@dataclass(frozen=True, slots=True)
class MethodDefaults:
    """What a method trains with unless the command line says otherwise."""

    lr: float
    steps: int
    embed_norm_lr: float | None = None  # full copies of base modules (PEFT modules_to_save); None = lr
    batch_size: int = 8
    rank: int = 8  # LoRA / QLoRA
    alpha: float = 16.0
    targets: tuple[str, ...] = PROJECTIONS
    virtual_tokens: int = 8  # prompt / P-tuning / prefix
    encoder_hidden: int = 128  # P-tuning's prompt encoder MLP
    quantized_base: bool = False  # QLoRA: the frozen base is bitsandbytes NF4


METHODS: dict[str, MethodDefaults] = {
    "lora": MethodDefaults(lr=1e-3, steps=30),
    "qlora": MethodDefaults(lr=1e-3, steps=30, quantized_base=True),
    "prompt": MethodDefaults(lr=3e-2, steps=80),
    "p_tuning": MethodDefaults(lr=3e-3, steps=80),
    "prefix": MethodDefaults(lr=1e-2, steps=80),
    "ia3": MethodDefaults(lr=3e-2, steps=80, targets=IA3_TARGETS),
}

KIND_METHODS: dict[str, MethodDefaults] = {
    "dora": MethodDefaults(lr=1e-3, steps=30),
    "bitfit": MethodDefaults(lr=1e-2, steps=60),
    "bottleneck": MethodDefaults(lr=1e-3, steps=40),
    # server/trainer/longlora.py; embeddings and norms at a tenth of the LoRA rate (arithmetic task, exact-match
    # 56.2% vs 45.8% at 1e-3; topic 100% at 1e-3 and 1e-4, 95.8% at 1e-5; measured with bench/methods.py settings)
    "longlora": MethodDefaults(lr=1e-3, steps=30, embed_norm_lr=1e-4),
}
ALL_METHODS: dict[str, MethodDefaults] = {**METHODS, **KIND_METHODS}


def method_defaults(method: str) -> MethodDefaults:
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(ALL_METHODS)}")
    return ALL_METHODS[method]


def check_targets(targets: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if unknown:
        raise ValueError(f"{what} targets {unknown} are not projections the server adapts: {PROJECTIONS}")


def build_peft_config(
    method: str, *, rank: int, alpha: float, targets: tuple[str, ...], virtual_tokens: int, encoder_hidden: int
) -> PeftConfig:
    """The PEFT config for `method` (task CAUSAL_LM) with the given hyper-parameters."""
    method_defaults(method)
    if method in ("bitfit", "bottleneck", "longlora"):
        raise ValueError(f"{method} is not a PEFT method (server/trainer/{method}.py trains it)")
    if method in ("lora", "qlora", "dora"):
        check_targets(targets, "LoRA")
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                          use_dora=method == "dora", task_type="CAUSAL_LM")
    if method == "prompt":
        # initialised from embeddings of random vocabulary tokens: on the scale the model expects
        return PromptTuningConfig(num_virtual_tokens=virtual_tokens, prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
                                  task_type="CAUSAL_LM")
    if method == "p_tuning":
        return PromptEncoderConfig(num_virtual_tokens=virtual_tokens, encoder_hidden_size=encoder_hidden,
                                   task_type="CAUSAL_LM")
    if method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=virtual_tokens, task_type="CAUSAL_LM")
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
