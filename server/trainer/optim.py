"""The optimiser: AdamW over the trainable parameters in learning-rate groups, and the warm-up schedule.

Two groups at most: the adapter's own weights at `lr`, and the full copies of base modules a method trains
(PEFT `modules_to_save`: LongLoRA's embeddings and norms) at `embed_norm_lr`. Those copies start at the base's
trained values, so the step size that suits a zero-initialised LoRA B moves them far off; LongLoRA trains them
with a smaller rate (see server/trainer/longlora.py).
"""

from __future__ import annotations

import torch

from server.trainer.config import TrainConfig
from server.trainer.methods import method_defaults

SAVED_MODULE_MARK = "modules_to_save"  # PEFT's name for its trainable copy of a base module


def param_groups(cfg: TrainConfig, named: list[tuple[str, torch.nn.Parameter]]) -> list[dict]:
    """AdamW groups: {"params", "lr", "base_lr"}; `base_lr` is the rate the warm-up scales."""
    lr = cfg.resolved("lr")
    saved_lr = cfg.resolved("embed_norm_lr") or lr
    adapter = [p for n, p in named if SAVED_MODULE_MARK not in n]
    saved = [p for n, p in named if SAVED_MODULE_MARK in n]
    groups = [{"params": adapter, "lr": lr, "base_lr": lr}]
    if saved:
        groups.append({"params": saved, "lr": saved_lr, "base_lr": saved_lr})
    return groups


def make_optimizer(cfg: TrainConfig, named: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
    groups = param_groups(cfg, named)
    if method_defaults(cfg.method).quantized_base and cfg.device.startswith("cuda"):  # QLoRA
        from server.model.quant import _bnb

        return _bnb().optim.PagedAdamW8bit(groups, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def set_warmup_lr(optimizer: torch.optim.Optimizer, step: int, warmup_steps: int) -> None:
    """Linear warm-up over `warmup_steps`, then each group's own constant rate."""
    scale = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * scale
