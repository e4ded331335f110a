"""BitFit served as a kind: the oracle is transformers' model with the same biases on its projections (what
`attention_bias=True, mlp_bias=True` builds), dense and NF4, and Qwen2 (whose q/k/v biases get deltas), in a
batch with base and LoRA sequences; malformed BitFit files refused with a message."""

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
from tests.kinds_adapters import bitfit_logits, make_bitfit_adapter
from tests.oracle_parity import assert_run_matches, oracle_for, run_mixed
from tests.peft_adapters import ALL_PROJ, AdapterSpec, make_peft_adapter


def assert_matches(model_dir: Path, adapters: dict[str, Path], quantize: bool, new_tokens: int) -> None:
    from tests.test_model_parity import hf_model

    run = run_mixed(model_dir, adapters, [None, None, *adapters], quantize, new_tokens, device_slots=16)
    assert_run_matches(run, oracle_for(model_dir, adapters, hf_model(model_dir, quantize), quantize))


@pytest.fixture(scope="module")
def bitfit_dirs(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bitfit")
    return {
        "bitfit-all": make_bitfit_adapter(tiny_llama_dir, root / "all", targets=ALL_PROJ, seed=31),
        "bitfit-qv": make_bitfit_adapter(tiny_llama_dir, root / "qv", targets=["q_proj", "v_proj", "down_proj"],
                                         seed=32),
        "lora": make_peft_adapter(tiny_llama_dir, AdapterSpec("lora", "lora", rank=4, targets=ALL_PROJ, seed=33),
                                  root / "lora"),
    }


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_bitfit_in_a_mixed_batch_matches_a_biased_transformers_model(tiny_llama_dir: Path,
                                                                     bitfit_dirs: dict[str, Path],
                                                                     quantize: bool) -> None:
    assert_matches(tiny_llama_dir, bitfit_dirs, quantize, new_tokens=5)


def test_bitfit_deltas_add_to_qwen2_biases(tmp_path: Path) -> None:
    from tests.tiny_models import make_tiny_model_dir

    qwen = make_tiny_model_dir(tmp_path / "qwen", architecture="Qwen2ForCausalLM")
    made = {"bitfit-q": make_bitfit_adapter(qwen, tmp_path / "bq", targets=["q_proj", "k_proj", "up_proj"], seed=34)}
    assert_matches(qwen, made, quantize=False, new_tokens=4)


def test_the_oracle_is_a_biased_llama(tiny_llama_dir: Path, bitfit_dirs: dict[str, Path]) -> None:
    """The helper's oracle equals a LlamaForCausalLM built with attention_bias=True, mlp_bias=True."""
    import transformers

    from tests.test_model_parity import hf_model

    cfg = transformers.AutoConfig.from_pretrained(tiny_llama_dir)
    cfg.attention_bias, cfg.mlp_bias = True, True
    biased = transformers.LlamaForCausalLM(cfg).eval()
    state = load_file(tiny_llama_dir / "model.safetensors")
    state.update(load_file(bitfit_dirs["bitfit-all"] / "adapter_model.safetensors"))
    missing, unexpected = biased.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    biased.tie_weights()
    ids = [3, 17, 250, 9, 4000, 12]
    with torch.no_grad():
        ref = biased(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(bitfit_logits(hf_model(tiny_llama_dir, False), bitfit_dirs["bitfit-all"], ids), ref)


def test_bitfit_is_read_and_described(tiny_llama_dir: Path, bitfit_dirs: dict[str, Path]) -> None:
    w = read_adapter(bitfit_dirs["bitfit-qv"], ModelArgs.from_dir(tiny_llama_dir), AdapterLimits(16, 32))
    assert w.describe() == {"kind": "BITFIT", "rank": 0, "target_modules": ["down_proj", "q_proj", "v_proj"],
                            "num_virtual_tokens": 0}


def _variant(src: Path, dst: Path, *, cfg: dict | None = None, tensors: dict | None = None) -> Path:
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(cfg or {})
    (dst / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(src / "adapter_model.safetensors")
    for key, value in (tensors or {}).items():
        if value is None:
            weights.pop(key)
        else:
            weights[key] = value
    save_file(weights, dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize("case, error, message", [
    ("peft-style-key", AdapterFormatError, "unexpected tensor"),
    ("not-a-projection", AdapterFormatError, "unknown target module"),
    ("layer-out-of-range", BaseModelMismatch, "addresses layer 7"),
    ("matrix", AdapterFormatError, "must be a vector"),
    ("wrong-width", BaseModelMismatch, "features; the base has"),
    ("targets-disagree", AdapterFormatError, "do not match"),
    ("weight-not-bias", AdapterFormatError, "unexpected tensor"),
])
def test_malformed_bitfit_is_refused(tiny_llama_dir: Path, bitfit_dirs: dict[str, Path], tmp_path: Path, case: str,
                                     error: type, message: str) -> None:
    src, dst = bitfit_dirs["bitfit-qv"], tmp_path / case
    q0 = "model.layers.0.self_attn.q_proj.bias"
    variants = {
        "peft-style-key": {"tensors": {"base_model.model." + q0: torch.ones(64)}},
        "not-a-projection": {"tensors": {"model.layers.0.self_attn.rotary.bias": torch.ones(64)}},
        "layer-out-of-range": {"tensors": {"model.layers.7.self_attn.q_proj.bias": torch.ones(64)}},
        "matrix": {"tensors": {q0: torch.ones(64, 1)}},
        "wrong-width": {"tensors": {q0: torch.ones(63)}},
        "targets-disagree": {"cfg": {"target_modules": ["q_proj"]}},
        "weight-not-bias": {"tensors": {"model.layers.0.self_attn.q_proj.weight": torch.ones(64, 64)}},
    }
    _variant(src, dst, **variants[case])
    with pytest.raises(error, match=message):
        read_adapter(dst, ModelArgs.from_dir(tiny_llama_dir), AdapterLimits(16, 32))
