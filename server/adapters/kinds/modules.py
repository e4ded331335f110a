"""PEFT tensor keys that address one of the seven projections of a decoder layer (LoRA, IA3, ...)."""

from __future__ import annotations

import re

import torch

from server.adapters.kinds.base import AdapterFormatError, BaseModelMismatch
from server.model.args import PROJECTIONS, ModelArgs

WEIGHTS_FILE = "adapter_model.safetensors"
_MODULE_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
    r"(lora_A|lora_B|ia3_l|lora_magnitude_vector)(?:\.weight)?$"
)
# keys named like the base model's own parameters (BitFit): model.layers.<i>.<self_attn|mlp>.<proj>.bias
BASE_PARAM_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(bias)$")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# options we do not serve, with the value that means "off"
_UNSUPPORTED = {"use_dora": False, "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
                "alpha_pattern": {}, "layer_replication": None, "trainable_token_indices": None}


def module_tensors(tensors: dict[str, torch.Tensor], args: ModelArgs, suffixes: tuple[str, ...],
                   pattern: re.Pattern[str] = _MODULE_KEY) -> dict[tuple[int, str, str], torch.Tensor]:
    """(layer, module, suffix) -> tensor, refusing keys that address anything else (`pattern`: PEFT's key names
    by default; groups layer, parent, module, suffix)."""
    out: dict[tuple[int, str, str], torch.Tensor] = {}
    for key, t in tensors.items():
        m = pattern.match(key)
        if m is None:
            raise AdapterFormatError(
                f"unexpected tensor {key!r} (only the seven projections of decoder layers are served)")
        layer, parent, module, suffix = int(m[1]), m[2], m[3], m[4]
        if module not in PROJECTIONS or _PARENT[module] != parent:
            raise AdapterFormatError(f"unknown target module {module!r} in {key!r}; served: {', '.join(PROJECTIONS)}")
        if suffix not in suffixes:
            raise AdapterFormatError(f"unexpected tensor {key!r} for this adapter type")
        if layer >= args.num_layers:
            raise BaseModelMismatch(f"tensor {key!r} addresses layer {layer}; the base has {args.num_layers} layers")
        out[(layer, module, suffix)] = t
    if not out:
        raise AdapterFormatError(f"{WEIGHTS_FILE} holds no adapter tensors")
    return out


def check_served_options(cfg: dict) -> None:
    """Refuse the PEFT options that change the math in ways we do not serve."""
    for option, off in _UNSUPPORTED.items():
        if cfg.get(option) not in (off, None) and cfg.get(option) != off:
            raise AdapterFormatError(f"{option}={cfg[option]!r} is not served")
    if cfg.get("bias", "none") != "none":
        raise AdapterFormatError(f"bias={cfg['bias']!r} is not served (only 'none')")
