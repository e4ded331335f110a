"""PEFT's tensor key names, parsed in one place. Each kind claims and checks its own keys through these parsers
(AdapterKind.check_tensor_header, before any tensor is read; its read(), on the tensors):

  base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.<suffix>[.weight]         a projection's adapter tensor
      suffix: lora_A / lora_B (the LoRA family), lora_magnitude_vector (DoRA), ia3_l (IA3)
  base_model.model.model.layers.<i>.<input_layernorm|post_attention_layernorm>.weight, base_model.model.model.norm
  .weight, base_model.model.model.embed_tokens.weight                                 saved modules (LongLoRA)
  model.layers.<i>.<self_attn|mlp>.<proj>.bias                                       a base parameter's name (BitFit)
  prompt_embeddings                                                                  virtual tokens / prefix
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from server.adapters.kinds.base import AdapterFormatError, BaseModelMismatch
from server.clip import clip
from server.model.args import PROJECTIONS, ModelArgs

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PROMPT_EMBEDDINGS = "prompt_embeddings"
EMBED_KEY = "base_model.model.model.embed_tokens.weight"
FINAL_NORM_KEY = "base_model.model.model.norm.weight"
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
LORA_MATRICES = ("lora_A", "lora_B")
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

_MODULE_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
                         r"(lora_A|lora_B|ia3_l|lora_magnitude_vector)(?:\.weight)?$")
_BASE_PARAM_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(bias)$")
_LAYER_NORM_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)"
                             r"\.weight$")


@dataclass(frozen=True, slots=True)
class ModuleKey:
    """A key that addresses one projection of a decoder layer."""

    layer: int
    parent: str  # "self_attn" or "mlp", as written in the key
    module: str  # "q_proj", ... as written in the key (checked against the base by `module_shape`)
    suffix: str  # "lora_A", "lora_B", "ia3_l", "lora_magnitude_vector", or "bias" (a base parameter's name)


def adapter_key(layer: int, module: str, suffix: str) -> str:
    """PEFT's saved name of a projection's adapter tensor (what module_key parses back)."""
    return f"base_model.model.model.layers.{layer}.{PARENT[module]}.{module}.{suffix}.weight"


def module_key(key: str) -> ModuleKey | None:
    """The projection a PEFT adapter tensor's key addresses, or None for any other key."""
    return _parsed(_MODULE_KEY.match(key))


def base_param_key(key: str) -> ModuleKey | None:
    """The projection a base model's own bias name (model.layers.<i>.<parent>.<proj>.bias) addresses, or None."""
    return _parsed(_BASE_PARAM_KEY.match(key))


def _parsed(m: re.Match[str] | None) -> ModuleKey | None:
    return None if m is None else ModuleKey(int(m[1]), m[2], m[3], m[4])


def is_lora_matrix(key: str) -> bool:
    """Whether a key names a lora_A / lora_B tensor (of a served projection or not: the LoRA reader says which)."""
    return key.removesuffix(".weight").endswith((".lora_A", ".lora_B"))


def norm_key(key: str, args: ModelArgs) -> tuple[int, str] | None:
    """(layer, name) of a saved RMSNorm weight ((num_layers, "norm") for the final norm), or None for any other key;
    BaseModelMismatch for a layer past the base's."""
    if key == FINAL_NORM_KEY:
        return args.num_layers, "norm"
    m = _LAYER_NORM_KEY.match(key)
    if m is None:
        return None
    if int(m[1]) >= args.num_layers:
        raise BaseModelMismatch(f"tensor {key} addresses layer {m[1]}; the base has {args.num_layers} layers")
    return int(m[1]), m[2]


def module_shape(key: str, parsed: ModuleKey, args: ModelArgs, suffixes: tuple[str, ...] | None = None
                 ) -> tuple[int, int]:
    """(in, out) features of the projection `parsed` (from `key`) addresses: AdapterFormatError for a module that is
    not one of the seven projections (or not under its parent), or a suffix not in `suffixes`; BaseModelMismatch
    for a layer past the base's."""
    if parsed.module not in PROJECTIONS or PARENT[parsed.module] != parsed.parent:
        raise AdapterFormatError(f"unknown target module {clip(parsed.module)} in {clip(key)}; served: "
                                 f"{', '.join(PROJECTIONS)}")
    if suffixes is not None and parsed.suffix not in suffixes:
        raise AdapterFormatError(f"unexpected tensor {clip(key)} for this adapter type")
    if parsed.layer >= args.num_layers:
        raise BaseModelMismatch(f"tensor {clip(key)} addresses layer {parsed.layer}; the base has {args.num_layers} "
                                f"layers")
    return args.projection_shape(parsed.module)


def module_tensors(tensors: dict[str, torch.Tensor], args: ModelArgs, suffixes: tuple[str, ...],
                   parse: Callable[[str], ModuleKey | None] = module_key) -> dict[tuple[int, str, str], torch.Tensor]:
    """(layer, module, suffix) -> tensor, refusing keys that address anything else (`parse`: PEFT's adapter keys by
    default, base_param_key for a base model's own names)."""
    out: dict[tuple[int, str, str], torch.Tensor] = {}
    for key, t in tensors.items():
        parsed = parse(key)
        if parsed is None:
            raise AdapterFormatError(
                f"unexpected tensor {clip(key)} (only the seven projections of decoder layers are served)")
        module_shape(key, parsed, args, suffixes)
        out[(parsed.layer, parsed.module, parsed.suffix)] = t
    if not out:
        raise AdapterFormatError(f"{WEIGHTS_FILE} holds no adapter tensors")
    return out
