"""PEFT parity: one mixed batch of base, LoRA, prompt, P-tuning, prefix and IA3 sequences, each compared
with PEFT's PeftModel for that one adapter on the same base weights (the oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.oracle_parity import LOGIT_ATOL, assert_run_matches, oracle_for, run_mixed
from tests.peft_adapters import ALL_PROJ, AdapterSpec, make_peft_adapter

SPECS = [
    AdapterSpec("lora-a", "lora", rank=8, alpha=16, targets=["q_proj", "v_proj"], seed=1),
    AdapterSpec("lora-b", "lora", rank=4, alpha=8, targets=ALL_PROJ, seed=2),
    AdapterSpec("lora-rs", "lora", rank=16, alpha=4, targets=["k_proj", "o_proj", "up_proj", "down_proj"],
                rslora=True, seed=3),
    AdapterSpec("prompt-a", "prompt", n_virtual=4, seed=4),
    AdapterSpec("prompt-b", "prompt", n_virtual=7, seed=5),
    AdapterSpec("ptune", "p_tuning", n_virtual=6, seed=6),
    AdapterSpec("prefix-a", "prefix", n_virtual=3, seed=7),
    AdapterSpec("prefix-b", "prefix", n_virtual=9, seed=8),
    AdapterSpec("ia3-a", "ia3", seed=9),
    AdapterSpec("ia3-b", "ia3", seed=10),
]


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft-adapters")
    return {s.name: make_peft_adapter(tiny_llama_dir, s, root / s.name) for s in SPECS}


def assert_batch_matches_peft(model_dir: Path, adapters: dict[str, Path], quantize: bool, new_tokens: int,
                              atol: float = LOGIT_ATOL) -> None:
    """Two base-model sequences and one per adapter in one batch through our engine; every sequence's logits at
    every step equal PeftModel's for its adapter (transformers alone for base-model sequences), and the greedy
    continuations agree."""
    from tests.test_model_parity import hf_model

    run = run_mixed(model_dir, adapters, [None, None, *adapters], quantize, new_tokens, device_slots=16)
    # dense: a float64 oracle to fall back on where fp32 summation order alone moves a logit past atol
    # (tests.oracle_parity.assert_close_to_oracle; seen on SmolLM2's base route: 0.0027 at seed 689405)
    exact = None if quantize else oracle_for(model_dir, adapters, hf_model(model_dir, False).double(), False)
    assert_run_matches(run, oracle_for(model_dir, adapters, hf_model(model_dir, quantize), quantize), atol, exact)


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_mixed_batch_matches_peft_per_adapter(tiny_llama_dir: Path, adapters: dict[str, Path], quantize: bool) -> None:
    assert_batch_matches_peft(tiny_llama_dir, adapters, quantize, new_tokens=6)


@pytest.mark.slow
def test_default_model_mixed_batch_matches_peft(default_model_dir: Path, tmp_path: Path) -> None:
    """The same 12-sequence mixed batch on the embedded SmolLM2-135M (30 layers, dense fp32). Over 30 layers
    fp32 summation-order differences reach ~1e-4 on logits of magnitude ~20, hence the wider tolerance."""
    made = {s.name: make_peft_adapter(default_model_dir, s, tmp_path / s.name) for s in SPECS}
    assert_batch_matches_peft(default_model_dir, made, quantize=False, new_tokens=3, atol=2e-3)


def test_mixed_batch_with_triton_kernels_matches_peft(tiny_llama_dir: Path, adapters: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The same mixed batch with the LoRA path forced through the Triton SGMV kernels (interpreted on CPU)."""
    from tests.test_model_parity import hf_model

    monkeypatch.setattr("kernels.MODE", "triton")  # SWITCHBOARD_KERNELS is read once, at import
    lora = {k: v for k, v in adapters.items() if k.startswith("lora")}
    run = run_mixed(tiny_llama_dir, lora, [None, *lora], False, new_tokens=3, device_slots=16)
    assert_run_matches(run, oracle_for(tiny_llama_dir, lora, hf_model(tiny_llama_dir, False), False))
