"""Reading AdapterHub's bottleneck-adapter files: the served subset of BnConfig and the tensors of one adapter
(the layout is described in server/adapters/kinds/bottleneck.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from server.adapters.kinds.base import AdapterFormatError, AdapterLimits, BaseModelMismatch
from server.adapters.numbers import config_number
from server.model.args import ModelArgs

MAX_SCALING = 1e4  # |scaling|, as |lora_alpha / r| for LoRA
PLACEMENTS = {"attention_adapters": "attention", "output_adapters": "mlp"}  # AdapterHub location -> our block
ACTIVATIONS = {"relu": 0, "gelu": 1, "silu": 2, "swish": 2}  # AdapterHub names (get_activation) -> our code
TENSOR_KEY = re.compile(r"^(?:[\w.]*\.)?layers\.(\d+)\.(attention_adapters|output_adapters)\.adapters\.([^.]+)\."
                        r"(adapter_down\.0|adapter_up)\.(weight|bias)$")
# BnConfig options we serve only at their default ("off") value
_OFF = {"ln_before": False, "ln_after": False, "use_gating": False, "phm_layer": False, "is_parallel": False,
        "inv_adapter": None, "adapter_residual_before_ln": False}


@dataclass(slots=True)
class BottleneckWeights:
    size: int  # bottleneck width = hidden // reduction_factor
    activation: str  # relu | gelu | silu
    scaling: float
    original_ln_before: bool
    original_ln_after: bool
    residual_before_ln: bool
    # (layer, block) -> (down [size, hidden], down_bias [size], up [hidden, size], up_bias [hidden])
    blocks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]

    @property
    def placements(self) -> tuple[str, ...]:
        return tuple(sorted({b for _, b in self.blocks}))


def _flag(cfg: dict, name: str, default: bool) -> bool:
    value = cfg.get(name, default)
    if not isinstance(value, bool):
        raise AdapterFormatError(f"{name}={value!r} is not served (only true / false)")
    return value


def parse_config(cfg: dict, hidden: int, limits: AdapterLimits) -> dict:
    """The served subset of an AdapterHub BnConfig dict, validated."""
    if cfg.get("architecture", "bottleneck") != "bottleneck":
        raise AdapterFormatError(f"AdapterHub architecture {cfg.get('architecture')!r} is not served (bottleneck is)")
    for option, off in _OFF.items():
        if cfg.get(option, off) not in (off, None):
            raise AdapterFormatError(f"{option}={cfg[option]!r} is not served")
    act = str(cfg.get("non_linearity", "relu")).lower()
    if act not in ACTIVATIONS:
        raise AdapterFormatError(f"non_linearity {act!r} is not served; served: relu, gelu, silu (swish)")
    factor = cfg.get("reduction_factor")
    if isinstance(factor, dict):
        raise AdapterFormatError(f"reduction_factor must be a positive number (one for all layers), got {factor!r}")
    factor = config_number("reduction_factor", factor, lo=0.0, lo_open=True, hi=float(hidden))
    size = max(1, int(hidden // factor))
    if size > limits.max_bottleneck_size:
        raise AdapterFormatError(f"bottleneck size {size} (hidden {hidden} / reduction_factor {factor}) exceeds "
                                 f"the server's maximum bottleneck size {limits.max_bottleneck_size} "
                                 f"(--max-bottleneck-size)")
    scaling = cfg.get("scaling", 1.0)
    if not isinstance(scaling, int | float) or isinstance(scaling, bool):
        raise AdapterFormatError(f"scaling={scaling!r} is not served (a number only)")
    scaling = config_number("scaling", scaling, lo=-MAX_SCALING, hi=MAX_SCALING)
    if not (_flag(cfg, "mh_adapter", False) or _flag(cfg, "output_adapter", True)):
        raise AdapterFormatError("neither mh_adapter nor output_adapter is set: the adapter is placed nowhere")
    return {"size": size, "activation": "silu" if act == "swish" else act, "scaling": float(scaling),
            "original_ln_before": _flag(cfg, "original_ln_before", True),
            "original_ln_after": _flag(cfg, "original_ln_after", True),
            "residual_before_ln": _flag(cfg, "residual_before_ln", True)}


def read_blocks(tensors: dict[str, torch.Tensor], args: ModelArgs, size: int, placements: set[str]
                ) -> dict[tuple[int, str], tuple[torch.Tensor, ...]]:
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    names = set()
    for key, t in tensors.items():
        m = TENSOR_KEY.match(key)
        if m is None:
            raise AdapterFormatError(f"unexpected tensor {key!r} (only bottleneck adapter_down / adapter_up of "
                                     f"attention_adapters / output_adapters are served)")
        layer, location, name, part, what = int(m[1]), m[2], m[3], m[4], m[5]
        if layer >= args.num_layers:
            raise BaseModelMismatch(f"tensor {key!r} addresses layer {layer}; the base has {args.num_layers} layers")
        block = PLACEMENTS[location]
        if block not in placements:
            raise AdapterFormatError(f"tensor {key!r} is for a placement the config does not enable")
        names.add(name)
        parts.setdefault((layer, block), {})[f"{part.split('.')[0]}.{what}"] = t
    if len(names) > 1:
        raise AdapterFormatError(f"the file holds several adapters {sorted(names)}; save one per directory")
    h = args.hidden_size
    want = {"adapter_down.weight": (size, h), "adapter_down.bias": (size,), "adapter_up.weight": (h, size),
            "adapter_up.bias": (h,)}
    blocks = {}
    for (layer, block), got in parts.items():
        for part, shape in want.items():
            if part not in got:
                raise AdapterFormatError(f"layer {layer} {block} adapter lacks {part}")
            if tuple(got[part].shape) != shape:
                raise BaseModelMismatch(f"{part} of layer {layer} {block} has shape {tuple(got[part].shape)}; the "
                                        f"config and base need {shape}")
        blocks[(layer, block)] = tuple(got[p] for p in want)
    if not blocks:
        raise AdapterFormatError("the weights file holds no bottleneck adapter tensors")
    return blocks
