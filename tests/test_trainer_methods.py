"""The training methods, declared by their own modules: the --method choices and every method's defaults stay
what the one table in server/trainer/methods.py said before the methods registered themselves."""

from __future__ import annotations

import pytest

from server.model.args import PROJECTIONS
from server.trainer.cli import parse_args
from server.trainer.methods import MethodDefaults, TrainingMethod, by_name, method_defaults, method_names, register

BEFORE = {
    "lora": MethodDefaults(lr=1e-3, steps=30),
    "qlora": MethodDefaults(lr=1e-3, steps=30, quantized_base=True),
    "prompt": MethodDefaults(lr=3e-2, steps=80),
    "p_tuning": MethodDefaults(lr=3e-3, steps=80),
    "prefix": MethodDefaults(lr=1e-2, steps=80),
    "ia3": MethodDefaults(lr=3e-2, steps=80, targets=("k_proj", "v_proj", "down_proj")),
    "dora": MethodDefaults(lr=1e-3, steps=30),
    "bitfit": MethodDefaults(lr=1e-2, steps=60),
    "bottleneck": MethodDefaults(lr=1e-3, steps=40),
    "longlora": MethodDefaults(lr=1e-3, steps=30, embed_norm_lr=1e-4),
}


def test_methods_and_defaults_are_unchanged() -> None:
    assert method_names() == list(BEFORE)
    assert method_names(plain_peft=True) == ["lora", "qlora", "prompt", "p_tuning", "prefix", "ia3"]
    for name, defaults in BEFORE.items():
        assert method_defaults(name) == defaults, name
    assert BEFORE["lora"].targets == PROJECTIONS and BEFORE["lora"].rank == 8 and BEFORE["lora"].alpha == 16.0
    for name in BEFORE:
        assert parse_args(["--method", name, "--output-dir", "x", "--task", "topic"]).method == name
    with pytest.raises(SystemExit):
        parse_args(["--method", "lorax", "--output-dir", "x", "--task", "topic"])
    with pytest.raises(ValueError, match="unknown method 'lorax'; choose one of lora, qlora"):
        by_name("lorax")


def test_a_method_registers_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(TrainingMethod("lora", BEFORE["lora"], by_name("lora").build))
