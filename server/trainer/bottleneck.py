"""Bottleneck-adapter training (Houlsby / Pfeiffer) on transformers' model; saved in AdapterHub's layout.

Each adapted placement (after attention: `attention_adapters`, after the feed-forward: `output_adapters`) of
each decoder layer gets down [size, hidden] + bias, up [hidden, size] + bias (AdapterHub's "bert" init:
N(0, 0.02) weights, zero biases), applied by forward hooks exactly as the served kind computes it
(server/adapters/kinds/bottleneck.py, which follows AdapterHub's Adapter with layer_norm=None):
  x = a + r if original_ln_before else a;  res = a if residual_before_ln else x
  h = scaling * up(act(down(x))) + res (+ r if original_ln_after)
`save_pretrained` writes adapter_config.json ({"config": BnConfig fields, "name", "hidden_size", ...}) and
adapter.safetensors (`model.layers.<i>.<location>.adapters.<name>.adapter_down.0.weight`, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from server.trainer.config import TrainConfig
from server.trainer.hooked import HookedModel
from server.trainer.methods import MethodDefaults, TrainingMethod, register

# AdapterHub's DoubleSeqBnConfig (Houlsby) and SeqBnConfig (Pfeiffer), the fields the server reads
_COMMON = {"architecture": "bottleneck", "original_ln_after": True, "residual_before_ln": True,
           "adapter_residual_before_ln": False, "ln_before": False, "ln_after": False, "init_weights": "bert",
           "is_parallel": False, "scaling": 1.0, "use_gating": False, "phm_layer": False, "dropout": 0.0,
           "inv_adapter": None, "leave_out": [], "stochastic_depth": 0.0}
CONFIGS = {
    "houlsby": {**_COMMON, "mh_adapter": True, "output_adapter": True, "non_linearity": "swish",
                "original_ln_before": False},
    "pfeiffer": {**_COMMON, "mh_adapter": False, "output_adapter": True, "non_linearity": "relu",
                 "original_ln_before": True},
}
_ACT = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu}
LOCATIONS = {"attention": "attention_adapters", "mlp": "output_adapters"}
ADAPTER_NAME = "bottleneck"


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, size: int, device) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, size, device=device)
        self.up = nn.Linear(size, hidden, device=device)
        for lin in (self.down, self.up):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)


class BottleneckModel(HookedModel):
    """transformers' causal LM with bottleneck adapters; forwards calls (forward, generate) to it."""

    def __init__(self, base: nn.Module, config: dict, base_dir: str | None = None) -> None:
        super().__init__()
        if config["non_linearity"] not in _ACT:
            raise ValueError(f"non_linearity {config['non_linearity']!r}: choose one of relu, gelu, silu")
        self.base, self.config, self.base_dir = base, dict(config), base_dir
        hidden = base.config.hidden_size
        self.size = max(1, int(hidden // config["reduction_factor"]))
        device = base.get_input_embeddings().weight.device
        blocks = [b for b, on in (("attention", config["mh_adapter"]), ("mlp", config["output_adapter"])) if on]
        if not blocks:
            raise ValueError("a bottleneck adapter needs mh_adapter or output_adapter")
        self.adapters = nn.ModuleDict()
        for i, layer in enumerate(base.model.layers):
            seen: dict[str, torch.Tensor] = {}
            layer.register_forward_pre_hook(self._keep(seen, "attention"), with_kwargs=True)
            layer.post_attention_layernorm.register_forward_pre_hook(self._keep(seen, "mlp"), with_kwargs=True)
            for block in blocks:
                adapter = Bottleneck(hidden, self.size, device)
                self.adapters[f"{i}_{block}"] = adapter
                module = layer.self_attn if block == "attention" else layer.mlp
                module.register_forward_hook(self._apply(seen, block, adapter))

    @staticmethod
    def _keep(seen: dict, block: str):
        def hook(module, args, kwargs):
            seen[block] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _apply(self, seen: dict, block: str, adapter: Bottleneck):
        cfg, act = self.config, _ACT[self.config["non_linearity"]]

        def hook(module, args, output):
            a = output[0] if isinstance(output, tuple) else output
            r = seen[block]
            x = a + r if cfg["original_ln_before"] else a
            res = a if cfg["residual_before_ln"] else x
            added = cfg["scaling"] * adapter.up(act(adapter.down(x))) + res  # the new hidden state minus r ...
            if not cfg["original_ln_after"]:
                added = added - r  # ... once the layer adds r back
            return (added, *output[1:]) if isinstance(output, tuple) else added
        return hook

    def save_pretrained(self, out: Path, safe_serialization: bool = True) -> None:
        out = Path(out)
        tensors = {}
        for key, adapter in self.adapters.items():
            layer, block = key.split("_", 1)
            p = f"model.layers.{layer}.{LOCATIONS[block]}.adapters.{ADAPTER_NAME}"
            tensors[f"{p}.adapter_down.0.weight"] = adapter.down.weight
            tensors[f"{p}.adapter_down.0.bias"] = adapter.down.bias
            tensors[f"{p}.adapter_up.weight"] = adapter.up.weight
            tensors[f"{p}.adapter_up.bias"] = adapter.up.bias
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, out / "adapter.safetensors")
        full = {"config": self.config, "hidden_size": self.base.config.hidden_size,
                "model_type": self.base.config.model_type, "name": ADAPTER_NAME,
                "model_class": type(self.base).__name__, "model_name": self.base_dir}
        (out / "adapter_config.json").write_text(json.dumps(full, indent=1))


def attach_bottleneck(base: nn.Module, variant: str, reduction_factor: float, non_linearity: str | None,
                      base_dir: str | None = None) -> BottleneckModel:
    if variant not in CONFIGS:
        raise ValueError(f"bottleneck variant {variant!r}: choose one of {', '.join(CONFIGS)}")
    config = {**CONFIGS[variant], "reduction_factor": reduction_factor}
    if non_linearity is not None:
        config["non_linearity"] = non_linearity
    return BottleneckModel(base, config, base_dir)


def _build(cfg: TrainConfig, base: nn.Module, model_dir: Path) -> BottleneckModel:
    torch.manual_seed(cfg.seed)
    return attach_bottleneck(base, cfg.bottleneck, cfg.reduction_factor, cfg.non_linearity, str(model_dir))


register(TrainingMethod("bottleneck", MethodDefaults(lr=1e-3, steps=40), _build))
