"""Adapter tensors at extreme but allowed magnitudes are served exactly as their oracle computes them.

The read check (server/adapters/numbers.py, tests/test_kind_numbers.py) refuses any tensor value beyond +-65504;
what it lets through must then be served correctly, not stored-then-broken. Decided: values up to that bound
are served (dense fp32 compute has the range for them: every layer renormalizes the residual stream), so an IA3
vector, a DoRA magnitude and a BitFit bias with entries of +-60,000 in every layer must give PEFT's (for BitFit:
the biased transformers model's) logits step by step in one mixed batch with the base model, finite, with the
float64 oracle as the referee where fp32 rounding on these ill-conditioned inputs differs (oracle_parity).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapters.peft_format import read_adapter
from server.config import AdapterLimits
from server.model.args import ModelArgs
from tests.kinds_adapters import make_bitfit_adapter, make_dora_adapter
from tests.oracle_parity import assert_run_matches, fp64_oracle_for, oracle_for, run_mixed
from tests.peft_adapters import AdapterSpec, make_peft_adapter

EXTREME = 60_000.0  # inside the +-65504 bound the read check allows


def _extreme(src: Path, dst: Path, part: str) -> Path:
    """A copy of `src` whose tensors named like `part` (every layer) hold +EXTREME at their first entry and
    -EXTREME at their last."""
    shutil.copytree(src, dst)
    (weights,) = [p for p in dst.iterdir() if p.suffix == ".safetensors"]
    tensors = load_file(weights)
    hit = [k for k in tensors if part in k]
    assert hit, (part, sorted(tensors))
    for k in hit:
        t = tensors[k].clone()
        t.view(-1)[0], t.view(-1)[-1] = EXTREME, -EXTREME
        tensors[k] = t
    save_file(tensors, weights)
    return dst


@pytest.fixture(scope="module")
def extreme_dirs(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("extremes")
    base = tiny_llama_dir
    made = {
        "ia3": make_peft_adapter(base, AdapterSpec("ia3", "ia3", seed=41), root / "ia3-src"),
        "dora": make_dora_adapter(base, root / "dora-src", rank=4, alpha=8, targets=["q_proj", "v_proj"], seed=42),
        "bitfit": make_bitfit_adapter(base, root / "bitfit-src", targets=["q_proj", "down_proj"], seed=43),
    }
    return {"ia3-big": _extreme(made["ia3"], root / "ia3", "ia3_l"),
            "dora-big": _extreme(made["dora"], root / "dora", "lora_magnitude_vector"),
            "bitfit-big": _extreme(made["bitfit"], root / "bitfit", "bias"),
            **{f"{k}-src": v for k, v in made.items()}}


def _big(dirs: dict[str, Path]) -> dict[str, Path]:
    return {k: v for k, v in dirs.items() if k.endswith("-big")}


def test_the_extremes_change_what_is_computed(tiny_llama_dir: Path, extreme_dirs: dict[str, Path]) -> None:
    """Not a vacuous check: each extreme adapter's oracle logits are far from the same adapter's unchanged ones."""
    from tests.test_model_parity import hf_model

    oracle = oracle_for(tiny_llama_dir, extreme_dirs, hf_model(tiny_llama_dir, False), False)
    ids = [3, 17, 250, 9, 400, 12]
    for kind in ("ia3", "dora", "bitfit"):
        big, src = oracle(f"{kind}-big", ids), oracle(f"{kind}-src", ids)
        assert torch.isfinite(big).all() and float((big - src).abs().max()) > 0.5, kind


def test_extreme_allowed_values_are_read(tiny_llama_dir: Path, extreme_dirs: dict[str, Path]) -> None:
    args = ModelArgs.from_dir(tiny_llama_dir)
    for path in _big(extreme_dirs).values():
        assert read_adapter(path, args, AdapterLimits(16, 32, max_bottleneck_size=16))


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_extreme_allowed_values_are_served_as_their_oracle_computes(tiny_llama_dir: Path,
                                                                     extreme_dirs: dict[str, Path],
                                                                     quantize: bool) -> None:
    from tests.test_model_parity import hf_model

    big = _big(extreme_dirs)
    run = run_mixed(tiny_llama_dir, big, [None, *big], quantize=quantize, new_tokens=4)
    for steps in run.steps:
        assert torch.isfinite(steps).all(), f"seed {run.seed}"
    base = hf_model(tiny_llama_dir, quantize)
    assert_run_matches(run, oracle_for(tiny_llama_dir, big, base, quantize),
                       exact_oracle=None if quantize else fp64_oracle_for(big, base))
