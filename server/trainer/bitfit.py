"""BitFit training: zero-initialised bias deltas on the targeted projections of transformers' model; only they train.

Each targeted nn.Linear gets a parameter `bitfit_delta` [out] and a forward hook adding it to the output (on top
of the base's own bias, if any: Qwen2's q/k/v). `save_pretrained` writes the server's BITFIT directory
(server/adapters/kinds/bitfit.py): keys `model.layers.<i>.<parent>.<proj>.bias`, i.e. the module's name + ".bias".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from server.adapters.kinds.bitfit import PEFT_TYPE
from server.model.args import PROJECTIONS
from server.trainer.config import TrainConfig
from server.trainer.hooked import HookedModel
from server.trainer.methods import MethodDefaults, TrainingMethod, register

DELTA = "bitfit_delta"


def _add_delta(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output + getattr(module, DELTA).to(output.dtype)


class BitFitModel(HookedModel):
    """transformers' causal LM with bias deltas; forwards calls (forward, generate) to it."""

    def __init__(self, base: nn.Module, targets: tuple[str, ...], base_dir: str | None = None) -> None:
        super().__init__()
        self.base = base
        self.base_dir = base_dir
        self.targets = tuple(targets)
        self.adapted: dict[str, nn.Linear] = {}  # module name -> the linear carrying a delta
        for name, module in base.named_modules():
            if name.rsplit(".", 1)[-1] in self.targets and ".layers." in f".{name}" and isinstance(module, nn.Linear):
                weight = module.weight
                module.register_parameter(DELTA, nn.Parameter(torch.zeros(module.out_features, device=weight.device)))
                module.register_forward_hook(_add_delta)
                self.adapted[name] = module
        if not self.adapted:
            raise ValueError(f"no projection named {list(self.targets)} found to adapt")

    def save_pretrained(self, out: Path, safe_serialization: bool = True) -> None:
        out = Path(out)
        tensors = {f"{name}.bias": getattr(m, DELTA).detach().float().cpu().contiguous()
                   for name, m in self.adapted.items()}
        save_file(tensors, out / "adapter_model.safetensors")
        cfg = {"peft_type": PEFT_TYPE, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in self.adapted}),
               "base_model_name_or_path": self.base_dir}
        (out / "adapter_config.json").write_text(json.dumps(cfg, indent=1))


def attach_bitfit(base: nn.Module, targets: tuple[str, ...], base_dir: str | None = None) -> BitFitModel:
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if unknown:
        raise ValueError(f"BitFit targets {unknown} are not projections the server adapts: {PROJECTIONS}")
    return BitFitModel(base, targets, base_dir)


def _build(cfg: TrainConfig, base: nn.Module, model_dir: Path) -> BitFitModel:
    return attach_bitfit(base, tuple(cfg.resolved("targets")), str(model_dir))  # zero-initialised: no seed needed


register(TrainingMethod("bitfit", MethodDefaults(lr=1e-2, steps=60), _build))
