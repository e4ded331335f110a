"""LongLoRA (Chen et al. 2023): LoRA + trained embeddings and RMSNorm weights + RoPE linear position interpolation.

A LongLoRA sequence computes, on its own rows of the step only:
  embeddings   the adapter's embedding table row of each token (PEFT `modules_to_save: ["embed_tokens"]`; the
               LM head stays the base's, as PEFT leaves a tied head on the original table)
  norms        RMSNorm with the adapter's weight: input / post-attention norm of each layer and the final norm
  RoPE         position * inv_freq / factor (transformers' rope_type "linear"), so it runs at factor x the base's
               context in the same batch as base sequences
  projections  LoRA's delta: a member of the LoRA family (lora.py), its norms / embeddings / factor extras of the
               family's one table set (lora_extras.py LongLoraSlots), applied by the family's one StepAdapter
Inference uses full attention; S2-Attn is a training-only device (server/trainer/longlora.py).

Files: PEFT's LoRA directory (`peft_type: "LORA"`) with
  modules_to_save  any of embed_tokens, input_layernorm, post_attention_layernorm, norm
  rope_scaling     {"rope_type": "linear", "factor": F}, 1 <= F <= MAX_ROPE_FACTOR (our key; PEFT ignores it)
and, next to lora_A / lora_B, the saved modules under PEFT's names:
  base_model.model.model.embed_tokens.weight                       [vocab, hidden]
  base_model.model.model.layers.<i>.input_layernorm.weight          [hidden]
  base_model.model.model.layers.<i>.post_attention_layernorm.weight [hidden]
  base_model.model.model.norm.weight                                [hidden]
"""

from __future__ import annotations

import torch

from server.adapters import validation
from server.adapters.kinds.base import AdapterFormatError, AdapterLimits, BaseModelMismatch
from server.adapters.kinds.lora import LoraKind
from server.adapters.kinds.lora_weights import LongLoraWeights
from server.adapters.kinds.peft_keys import EMBED_KEY, is_lora_matrix, norm_key
from server.clip import clip
from server.model.args import ModelArgs

MAX_ROPE_FACTOR = 64.0
SAVED_MODULES = ("embed_tokens", "input_layernorm", "post_attention_layernorm", "norm")


def is_longlora(cfg: dict) -> bool:
    """A PEFT LoRA config with trained non-LoRA modules or a RoPE interpolation factor."""
    return (cfg.get("peft_type") == "LORA" and not cfg.get("use_dora")
            and bool(cfg.get("modules_to_save") or cfg.get("rope_scaling")))


def rope_factor(cfg: dict) -> float:
    """The linear interpolation factor recorded in the config (1.0 when there is none)."""
    scaling = cfg.get("rope_scaling")
    if scaling is None:
        return 1.0
    if not isinstance(scaling, dict):
        raise AdapterFormatError(f"rope_scaling must be an object like {{\"rope_type\": \"linear\", \"factor\": 2}}, "
                                 f"got {clip(scaling)}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "linear":
        raise AdapterFormatError(f"rope_scaling rope_type {clip(kind)} is not served (only 'linear')")
    factor = validation.check_scale("rope_scaling factor", scaling.get("factor"), MAX_ROPE_FACTOR)
    if factor < 1.0:
        raise AdapterFormatError(f"rope_scaling factor {factor:g} must be >= 1 (it extends the context)")
    return factor


class LongLoraKind(LoraKind):
    composable = False  # LongLoRA's own norms, embeddings and RoPE factor cannot mix with another adapter's
    name = "LONGLORA"
    peft_types = ()  # read by config (is_longlora), never by peft_type alone

    def accepts(self, cfg: dict) -> bool:
        return is_longlora(cfg)

    def check_config(self, cfg: dict) -> None:
        saved = cfg.get("modules_to_save") or []
        if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
            raise AdapterFormatError(f"modules_to_save must be a list of module names, got {clip(saved)}")
        unknown = sorted(set(saved) - set(SAVED_MODULES))
        if unknown:
            raise AdapterFormatError(f"modules_to_save {unknown} are not served for LongLoRA; served: "
                                     f"{', '.join(SAVED_MODULES)}")
        rope_factor(cfg)
        super().check_config(_lora_config(cfg))

    def read(self, cfg: dict, tensors: dict[str, torch.Tensor], args: ModelArgs,
             limits: AdapterLimits) -> LongLoraWeights:
        self.check_config(cfg)
        lora_tensors = {k: t for k, t in tensors.items() if is_lora_matrix(k)}
        norms: dict[tuple[int, str], torch.Tensor] = {}
        embed = None
        for key, t in tensors.items():
            if key in lora_tensors:
                continue
            if not self.check_tensor_header(key, tuple(t.shape), args, limits):
                raise AdapterFormatError(f"unexpected tensor {clip(key)} in a LongLoRA adapter")
            if key == EMBED_KEY:
                embed = t
            else:
                norms[norm_key(key, args)] = t
        saved = set(cfg.get("modules_to_save") or [])
        if embed is not None and "embed_tokens" not in saved:
            raise AdapterFormatError("the adapter holds an embedding table but modules_to_save lacks embed_tokens")
        if "embed_tokens" in saved and embed is None:
            raise AdapterFormatError(f"modules_to_save names embed_tokens but {EMBED_KEY} is missing")
        for name in ("input_layernorm", "post_attention_layernorm", "norm"):
            if name in saved and not any(n == name for _, n in norms):
                raise AdapterFormatError(f"modules_to_save names {name} but none of its weights are saved")
        lora = super().read(_lora_config(cfg), lora_tensors, args, limits)
        return LongLoraWeights(lora, norms, embed, rope_factor(cfg))

    def check_tensor_header(self, key: str, shape: tuple[int, ...], args: ModelArgs, limits: AdapterLimits) -> bool:
        """The saved embedding table and norm weights (lora_A / lora_B: LoRA's check)."""
        if key == EMBED_KEY:
            if len(shape) != 2:
                raise AdapterFormatError(f"{key} has shape {shape}; it must be [vocab, hidden]")
            if shape != (args.vocab_size, args.hidden_size):
                raise BaseModelMismatch(f"{key} has shape {shape}; the base's table is "
                                        f"({args.vocab_size}, {args.hidden_size})")
            return True
        if norm_key(key, args) is None:
            return super().check_tensor_header(key, shape, args, limits)
        if len(shape) != 1:
            raise AdapterFormatError(f"{key} has shape {shape}; a norm weight is a vector")
        if shape[0] != args.hidden_size:
            raise BaseModelMismatch(f"{key} has {shape[0]} features; the base's hidden size is {args.hidden_size}")
        return True

    def tensors(self, payload: LongLoraWeights) -> list[torch.Tensor]:
        extra = [] if payload.embed is None else [payload.embed]
        return [*super().tensors(payload.lora), *payload.norms.values(), *extra]

    def describe(self, payload: LongLoraWeights) -> dict:
        return {**super().describe(payload.lora), "rope_factor": payload.factor}


def _lora_config(cfg: dict) -> dict:
    """The config without the LongLoRA options, as the LoRA reader checks it."""
    return {k: v for k, v in cfg.items() if k not in ("modules_to_save", "rope_scaling")}
