"""The training methods, each declared by its own module (one import per module in server/trainer/__init__.py):
its default hyper-parameters and how it builds the trainable model on the frozen base.

  server/trainer/peft_methods.py   PEFT's methods: lora, qlora, prompt, p_tuning, prefix, ia3; and dora (PEFT's
                                   LoRA with use_dora, served by the DORA kind)
  server/trainer/bitfit.py         bitfit (our BITFIT format; not a PEFT method)
  server/trainer/bottleneck.py     bottleneck (AdapterHub's layout; not a PEFT method)
  server/trainer/longlora.py       longlora (a PEFT LoRA with modules_to_save and a RoPE factor, the LONGLORA kind)

Every method writes an adapter our server reads unchanged (server/adapters/peft_format.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from server.model.args import PROJECTIONS

if TYPE_CHECKING:
    from torch import nn

    from server.trainer.config import TrainConfig


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


# (the run's config, the frozen base model, the base's directory) -> the model whose trainable parameters train
Build = Callable[["TrainConfig", "nn.Module", Path], "nn.Module"]


@dataclass(frozen=True, slots=True)
class TrainingMethod:
    name: str  # --method
    defaults: MethodDefaults
    build: Build
    # a plain PEFT adapter: PEFT loads its directory and the server serves it as the kind its peft_type names
    # (tests/test_trainer.py holds these to PEFT's output; the others to their kinds' oracles, test_kinds_trainer)
    plain_peft: bool = False


_METHODS: dict[str, TrainingMethod] = {}


def register(method: TrainingMethod) -> TrainingMethod:
    if method.name in _METHODS:
        raise ValueError(f"training method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def registered() -> tuple[TrainingMethod, ...]:
    """Every method, in registration order (the CLI's --method choices)."""
    return tuple(_METHODS.values())


def method_names(*, plain_peft: bool | None = None) -> list[str]:
    """The methods' names; only the plain PEFT ones (True) or only the others (False)."""
    return [m.name for m in _METHODS.values() if plain_peft is None or m.plain_peft == plain_peft]


def by_name(method: str) -> TrainingMethod:
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(_METHODS)}")
    return _METHODS[method]


def method_defaults(method: str) -> MethodDefaults:
    return by_name(method).defaults


def check_targets(targets: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if unknown:
        raise ValueError(f"{what} targets {unknown} are not projections the server adapts: {PROJECTIONS}")
