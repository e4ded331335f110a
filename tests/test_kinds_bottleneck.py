"""Bottleneck adapters (AdapterHub layout: Houlsby, Pfeiffer, and other flag settings) served as a kind, in a
batch with base and LoRA sequences, each equal to an independent implementation by forward hooks on
transformers' model (AdapterHub itself pins transformers 4.x); dense and NF4; malformed files refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapters.kinds import AdapterFormatError, BaseModelMismatch
from server.adapters.peft_format import read_adapter
from server.config import AdapterLimits
from server.model.args import ModelArgs
from tests.kinds_adapters import HOULSBY, PFEIFFER, bottleneck_logits, write_bottleneck_adapter
from tests.oracle_parity import assert_run_matches, oracle_for, run_mixed
from tests.peft_adapters import ALL_PROJ, AdapterSpec, make_peft_adapter

OTHER = {**PFEIFFER, "non_linearity": "gelu", "original_ln_before": False, "residual_before_ln": False,
         "reduction_factor": 8, "scaling": 0.5, "mh_adapter": True}


def assert_matches(model_dir: Path, adapters: dict[str, Path], quantize: bool, new_tokens: int) -> None:
    from tests.test_model_parity import hf_model

    run = run_mixed(model_dir, adapters, [None, None, *adapters], quantize, new_tokens, device_slots=16)
    assert_run_matches(run, oracle_for(model_dir, adapters, hf_model(model_dir, quantize), quantize))


@pytest.fixture(scope="module")
def bn_dirs(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bottleneck")
    return {
        "bn-houlsby": write_bottleneck_adapter(tiny_llama_dir, root / "houlsby", HOULSBY, seed=41),
        "bn-pfeiffer": write_bottleneck_adapter(tiny_llama_dir, root / "pfeiffer", PFEIFFER, seed=42),
        "bn-other": write_bottleneck_adapter(tiny_llama_dir, root / "other", OTHER, seed=43),
        "lora": make_peft_adapter(tiny_llama_dir, AdapterSpec("lora", "lora", rank=4, targets=ALL_PROJ, seed=44),
                                  root / "lora"),
    }


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_bottleneck_in_a_mixed_batch_matches_the_hooked_oracle(tiny_llama_dir: Path, bn_dirs: dict[str, Path],
                                                               quantize: bool) -> None:
    assert_matches(tiny_llama_dir, bn_dirs, quantize, new_tokens=5)


def test_the_adapter_changes_the_output(tiny_llama_dir: Path, bn_dirs: dict[str, Path]) -> None:
    from tests.test_model_parity import hf_model

    base = hf_model(tiny_llama_dir, False)
    ids = [5, 99, 1000, 7, 31]
    with torch.no_grad():
        plain = base(torch.tensor([ids])).logits[0]
    for name in ("bn-houlsby", "bn-pfeiffer", "bn-other"):
        assert (bottleneck_logits(base, bn_dirs[name], ids) - plain).abs().max() > 1e-2, name


def test_bottleneck_is_read_and_described(tiny_llama_dir: Path, bn_dirs: dict[str, Path]) -> None:
    args = ModelArgs.from_dir(tiny_llama_dir)
    h = read_adapter(bn_dirs["bn-houlsby"], args, AdapterLimits(16, 32))
    assert h.describe() == {"kind": "BOTTLENECK", "rank": 4, "target_modules": ["attention", "mlp"],
                            "num_virtual_tokens": 0}
    p = read_adapter(bn_dirs["bn-pfeiffer"], args, AdapterLimits(16, 32))
    assert p.describe()["target_modules"] == ["mlp"] and p.payload.activation == "relu"


def _variant(src: Path, dst: Path, *, cfg: dict | None = None, top: dict | None = None,
             tensors: dict | None = None, pickled: bool = False) -> Path:
    dst.mkdir()
    full = json.loads((src / "adapter_config.json").read_text())
    full["config"].update(cfg or {})
    full.update(top or {})
    (dst / "adapter_config.json").write_text(json.dumps(full))
    weights = load_file(src / "adapter.safetensors")
    for key, value in (tensors or {}).items():
        if value is None:
            weights.pop(key)
        else:
            weights[key] = value
    if pickled:
        (dst / "pytorch_adapter.bin").write_bytes(b"not read")
    else:
        save_file(weights, dst / "adapter.safetensors")
    return dst


P0 = "model.layers.0.output_adapters.adapters.bn"


@pytest.mark.parametrize("case, error, message", [
    ("pickle-only", AdapterFormatError, "pickled pytorch_adapter.bin"),
    ("layer-norm-after", AdapterFormatError, "ln_after=True is not served"),
    ("gating", AdapterFormatError, "use_gating=True is not served"),
    ("parallel", AdapterFormatError, "is_parallel=True is not served"),
    ("tanh", AdapterFormatError, "non_linearity 'tanh' is not served"),
    ("per-layer-factor", AdapterFormatError, "reduction_factor must be"),
    ("post-add", AdapterFormatError, "residual_before_ln='post_add' is not served"),
    ("learned-scaling", AdapterFormatError, "scaling='learned' is not served"),
    ("placed-nowhere", AdapterFormatError, "placed nowhere"),
    ("attention-not-enabled", AdapterFormatError, "placement the config does not enable"),
    ("missing-bias", AdapterFormatError, "lacks adapter_up.bias"),
    ("wrong-size", BaseModelMismatch, "the config and base need"),
    ("other-hidden", BaseModelMismatch, "hidden size 128"),
    ("two-adapters", AdapterFormatError, "several adapters"),
    ("stray-key", AdapterFormatError, "unexpected tensor"),
    ("too-wide", AdapterFormatError, "exceeds the server's maximum bottleneck size 16"),
])
def test_malformed_bottleneck_is_refused(tiny_llama_dir: Path, bn_dirs: dict[str, Path], tmp_path: Path, case: str,
                                         error: type, message: str) -> None:
    src, dst = bn_dirs["bn-pfeiffer"], tmp_path / case
    variants = {
        "pickle-only": {"pickled": True},
        "layer-norm-after": {"cfg": {"ln_after": True}},
        "gating": {"cfg": {"use_gating": True}},
        "parallel": {"cfg": {"is_parallel": True}},
        "tanh": {"cfg": {"non_linearity": "tanh"}},
        "per-layer-factor": {"cfg": {"reduction_factor": {"0": 16, "default": 16}}},
        "post-add": {"cfg": {"residual_before_ln": "post_add"}},
        "learned-scaling": {"cfg": {"scaling": "learned"}},
        "placed-nowhere": {"cfg": {"output_adapter": False}},
        "attention-not-enabled": {"tensors": {P0.replace("output_", "attention_") + ".adapter_up.bias":
                                              torch.ones(64)}},
        "missing-bias": {"tensors": {f"{P0}.adapter_up.bias": None}},
        "wrong-size": {"cfg": {"reduction_factor": 8}},
        "other-hidden": {"top": {"hidden_size": 128}},
        "two-adapters": {"tensors": {P0.replace(".bn", ".other") + ".adapter_up.bias": torch.ones(64)}},
        "stray-key": {"tensors": {"heads.bn.1.weight": torch.ones(3)}},
        "too-wide": {"cfg": {"reduction_factor": 2}},
    }
    _variant(src, dst, **variants[case])
    with pytest.raises(error, match=message):
        read_adapter(dst, ModelArgs.from_dir(tiny_llama_dir), AdapterLimits(16, 32, max_bottleneck_size=16))


def test_a_bottleneck_wider_than_the_lora_rank_limit_is_served(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The bottleneck width has its own limit (max_bottleneck_size), not max_lora_rank: a 32-wide bottleneck on a
    server capped at LoRA rank 4 generates its oracle's tokens; over its own limit it is refused by name."""
    from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
    from server.engine.engine import Engine
    from server.engine.request import GenerationRequest, SamplingParams
    from tests.engine_utils import collect
    from tests.test_model_parity import hf_model

    wide = write_bottleneck_adapter(tiny_llama_dir, tmp_path / "wide", {**PFEIFFER, "reduction_factor": 2}, seed=45)
    args = ModelArgs.from_dir(tiny_llama_dir)
    assert read_adapter(wide, args, AdapterLimits(4, 32, max_bottleneck_size=32)).describe()["rank"] == 32
    with pytest.raises(AdapterFormatError, match="at most 31|maximum bottleneck size 31"):
        read_adapter(wide, args, AdapterLimits(64, 32, max_bottleneck_size=31))
    engine = Engine.create(ModelConfig(path=str(tiny_llama_dir), quantize=False), EngineConfig(),
                           AdapterPoolConfig(device_slots=2, max_lora_rank=4, max_bottleneck_size=32))
    engine.pool.register("wide", wide)
    engine.start()
    try:
        prompt = [5, 99, 1000, 7, 31]
        out = collect(engine.submit(GenerationRequest("w", tuple(prompt), SamplingParams(max_new_tokens=4,
                                                                                        ignore_eos=True),
                                                      adapter="wide"))).token_ids
    finally:
        engine.shutdown()
    ref = bottleneck_logits(hf_model(tiny_llama_dir, False), wide, prompt + out)
    assert out == ref[len(prompt) - 1 : -1].argmax(-1).tolist()
