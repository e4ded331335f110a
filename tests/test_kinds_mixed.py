"""One mixed batch holding every kind we serve: base, LoRA x3 (ranks 8 / 4 / rsLoRA 16), DoRA x2, prompt x2,
P-tuning, prefix x2, IA3 x2, BitFit x2, bottleneck Houlsby / Pfeiffer / other flags, LongLoRA x2 (RoPE factor 2,
prompts past the base's context on the tiny model), with two adapters shared by two sequences each (24
sequences). Each sequence's logits at every step equal its own oracle: PEFT's PeftModel (PEFT kinds, DoRA),
transformers' model with the biases (BitFit), forward hooks (bottleneck), PeftModel on transformers' linear RoPE
at the adapter's factor (LongLoRA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.kinds_adapters import (
    HOULSBY,
    PFEIFFER,
    make_bitfit_adapter,
    make_dora_adapter,
    write_bottleneck_adapter,
)
from tests.longlora_adapters import make_longlora_adapter
from tests.oracle_parity import LOGIT_ATOL, assert_run_matches, fp64_oracle_for, oracle_for, run_mixed
from tests.peft_adapters import ALL_PROJ, make_peft_adapter
from tests.test_adapter_parity import SPECS

OTHER_BN = {**PFEIFFER, "non_linearity": "gelu", "original_ln_before": False, "residual_before_ln": False,
            "reduction_factor": 8, "scaling": 0.5, "mh_adapter": True}


def make_all(model_dir: Path, root: Path) -> dict[str, Path]:
    """Every kind's adapters; bottleneck sizes 4 and 8 whatever the hidden size (within max_lora_rank 16)."""
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    made = {s.name: make_peft_adapter(model_dir, s, root / s.name) for s in SPECS}
    made["dora-a"] = make_dora_adapter(model_dir, root / "dora-a", rank=4, alpha=8, targets=["q_proj", "v_proj"],
                                       seed=51)
    made["dora-rs"] = make_dora_adapter(model_dir, root / "dora-rs", rank=8, alpha=4, targets=ALL_PROJ, seed=52,
                                        rslora=True)
    made["bitfit-all"] = make_bitfit_adapter(model_dir, root / "bitfit-all", targets=ALL_PROJ, seed=53)
    made["bitfit-qv"] = make_bitfit_adapter(model_dir, root / "bitfit-qv", targets=["q_proj", "v_proj"], seed=54)
    for name, cfg, size, seed in (("bn-houlsby", HOULSBY, 4, 55), ("bn-pfeiffer", PFEIFFER, 4, 56),
                                  ("bn-other", OTHER_BN, 8, 57)):
        made[name] = write_bottleneck_adapter(model_dir, root / name, {**cfg, "reduction_factor": hidden // size},
                                              seed=seed)
    made["ll-all"] = make_longlora_adapter(model_dir, root / "ll-all", rank=8, alpha=16, targets=["q_proj", "v_proj"],
                                           seed=58, factor=2.0)
    made["ll-norms"] = make_longlora_adapter(model_dir, root / "ll-norms", rank=4, alpha=8, targets=ALL_PROJ,
                                             seed=59, factor=2.0, saved=["input_layernorm", "norm"])
    return made


def assert_every_kind_matches(model_dir: Path, adapters: dict[str, Path], quantize: bool, new_tokens: int,
                              atol: float, long_prompt: int = 16, max_model_len: int | None = None) -> None:
    """long_prompt: the LongLoRA sequences' prompt length (the others draw 2..15 tokens). Dense runs fall back on
    the float64 oracles where ours is outside atol of the fp32 ones (assert_close_to_oracle)."""
    from tests.test_model_parity import hf_model

    routes: list[str | None] = [None, None, *adapters, "lora-a", "dora-rs"]  # shared adapters, two sequences each
    assert len(routes) >= 20

    def length(route: str | None, g: torch.Generator) -> int:
        if route and route.startswith("ll-"):
            return long_prompt - int(torch.randint(0, 8, (1,), generator=g))
        return int(torch.randint(2, 16, (1,), generator=g))

    run = run_mixed(model_dir, adapters, routes, quantize, new_tokens, length, max_model_len=max_model_len)
    base = hf_model(model_dir, quantize)
    exact = None if quantize else fp64_oracle_for(adapters, base)
    assert_run_matches(run, oracle_for(model_dir, adapters, base, quantize), atol, exact)


@pytest.fixture(scope="module")
def all_adapters(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    return make_all(tiny_llama_dir, tmp_path_factory.mktemp("every-kind"))


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_every_kind_in_one_batch_matches_its_oracle(tiny_llama_dir: Path, all_adapters: dict[str, Path],
                                                    quantize: bool) -> None:
    assert_every_kind_matches(tiny_llama_dir, all_adapters, quantize, new_tokens=5, atol=LOGIT_ATOL,
                              long_prompt=2 * 512 - 10, max_model_len=2 * 512)  # LongLoRA at ~2x the 512 context


@pytest.mark.slow
def test_default_model_every_kind_in_one_batch(default_model_dir: Path, tmp_path: Path) -> None:
    """The same batch on the embedded SmolLM2-135M (30 layers, dense fp32); the tolerance of the existing
    default-model parity test (fp32 summation order over 30 layers, logits ~20). The LongLoRA prompts (600
    tokens, positions interpolated by 2) stay inside its 8192 context: 16k-token prompts are out of reach of a
    CPU test and of the oracle's dense attention; past-the-context serving is the tiny model's test."""
    assert_every_kind_matches(default_model_dir, make_all(default_model_dir, tmp_path), quantize=False,
                              new_tokens=3, atol=2e-3, long_prompt=600)
