"""DoRA served as a kind: PEFT's PeftModel (use_dora=True) is the oracle, on dense and NF4 bases and on a base
with projection biases (Qwen2), in a batch with base and plain LoRA sequences; malformed DoRA files refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapters import kinds
from server.adapters.kinds import AdapterFormatError, BaseModelMismatch
from server.adapters.kinds.lora_extras import dora_gain
from server.adapters.kinds.lora_tables import LoraTables
from server.adapters.peft_format import read_adapter
from server.config import AdapterLimits
from server.model.args import ModelArgs
from tests.kinds_adapters import make_dora_adapter
from tests.peft_adapters import ALL_PROJ, AdapterSpec, make_peft_adapter
from tests.test_adapter_parity import LOGIT_ATOL, assert_batch_matches_peft

NF4_ATOL = 2e-4  # NF4 base: both sides multiply by the same dequantized weights; summation order only


@pytest.fixture(scope="module")
def dora_dirs(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dora")
    return {
        "dora-a": make_dora_adapter(tiny_llama_dir, root / "a", rank=4, alpha=8, targets=["q_proj", "v_proj"],
                                    seed=21),
        "dora-b": make_dora_adapter(tiny_llama_dir, root / "b", rank=8, alpha=4, targets=ALL_PROJ, seed=22,
                                    rslora=True),
        "lora": make_peft_adapter(tiny_llama_dir, AdapterSpec("lora", "lora", rank=4, targets=ALL_PROJ, seed=23),
                                  root / "lora"),
    }


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_dora_in_a_mixed_batch_matches_peft(tiny_llama_dir: Path, dora_dirs: dict[str, Path], quantize: bool) -> None:
    assert_batch_matches_peft(tiny_llama_dir, dora_dirs, quantize, new_tokens=5,
                              atol=NF4_ATOL if quantize else LOGIT_ATOL)


def test_dora_on_a_base_with_biases_matches_peft(tmp_path: Path) -> None:
    """Qwen2 has q/k/v biases: PEFT scales W x + s B A x only, so the tables add (1 - g) b back."""
    from tests.tiny_models import make_tiny_model_dir

    qwen = make_tiny_model_dir(tmp_path / "qwen", architecture="Qwen2ForCausalLM")
    made = {"dora-q": make_dora_adapter(qwen, tmp_path / "dq", rank=4, alpha=8, targets=["q_proj", "k_proj", "o_proj"],
                                        seed=24)}
    assert_batch_matches_peft(qwen, made, quantize=False, new_tokens=4)


def test_dora_config_is_read_by_the_dora_kind_and_plain_lora_by_lora(tiny_llama_dir: Path,
                                                                     dora_dirs: dict[str, Path]) -> None:
    args = ModelArgs.from_dir(tiny_llama_dir)
    assert read_adapter(dora_dirs["dora-a"], args, AdapterLimits(16, 32)).kind == "DORA"
    assert read_adapter(dora_dirs["lora"], args, AdapterLimits(16, 32)).kind == "LORA"
    described = read_adapter(dora_dirs["dora-b"], args, AdapterLimits(16, 32)).describe()
    assert described["kind"] == "DORA" and described["rank"] == 8 and len(described["target_modules"]) == 7


def test_gain_is_magnitude_over_the_merged_row_norm() -> None:
    g = torch.Generator().manual_seed(5)
    w, a, b = torch.randn(6, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    m = torch.rand(6, generator=g) + 0.5
    merged = w + 0.7 * b @ a
    expected = torch.stack([m[i] / merged[i].pow(2).sum().sqrt() for i in range(6)])
    torch.testing.assert_close(dora_gain(w, a, b, 0.7, m), expected)


def test_fill_without_base_weights_is_refused(tiny_llama_dir: Path, dora_dirs: dict[str, Path]) -> None:
    args = ModelArgs.from_dir(tiny_llama_dir)
    weights = read_adapter(dora_dirs["dora-a"], args, AdapterLimits(16, 32))
    tables = LoraTables(args, 2, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="base model's weights"):
        tables.fill(0, weights.payload)
    assert tables.ranks == [0, 0] and tables.dora.gain == {}  # nothing half-filled


def _broken(src: Path, dst: Path, *, cfg: dict | None = None, drop: str | None = None,
            reshape: tuple[str, tuple[int, ...]] | None = None) -> Path:
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(cfg or {})
    (dst / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(src / "adapter_model.safetensors")
    if drop is not None:
        tensors = {k: v for k, v in tensors.items() if drop not in k}
    if reshape is not None:
        key = next(k for k in tensors if reshape[0] in k)
        tensors[key] = torch.ones(reshape[1])
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize("case, error, message", [
    ("no-magnitude", AdapterFormatError, "lora_magnitude_vector tensors are missing"),
    ("one-magnitude-missing", AdapterFormatError, "unmatched"),
    ("magnitude-matrix", AdapterFormatError, "must be a vector"),
    ("magnitude-wrong-width", BaseModelMismatch, "features; the base has"),
    ("fan-in-fan-out", AdapterFormatError, "fan_in_fan_out"),
    ("dora-with-bias", AdapterFormatError, "bias="),
])
def test_malformed_dora_is_refused(tiny_llama_dir: Path, dora_dirs: dict[str, Path], tmp_path: Path, case: str,
                                   error: type, message: str) -> None:
    src = dora_dirs["dora-a"]
    dst = tmp_path / case
    if case == "no-magnitude":
        _broken(src, dst, drop="lora_magnitude_vector")
    elif case == "one-magnitude-missing":
        _broken(src, dst, drop="layers.1.self_attn.v_proj.lora_magnitude_vector")
    elif case == "magnitude-matrix":
        _broken(src, dst, reshape=("lora_magnitude_vector", (64, 2)))
    elif case == "magnitude-wrong-width":
        _broken(src, dst, reshape=("lora_magnitude_vector", (65,)))
    elif case == "fan-in-fan-out":
        _broken(src, dst, cfg={"fan_in_fan_out": True})
    else:
        _broken(src, dst, cfg={"bias": "all"})
    with pytest.raises(error, match=message):
        read_adapter(dst, ModelArgs.from_dir(tiny_llama_dir), AdapterLimits(16, 32))


def test_without_the_dora_kind_a_dora_file_is_refused_by_lora(tiny_llama_dir: Path, dora_dirs: dict[str, Path]) -> None:
    before = dict(kinds._KINDS)  # registration order matters: restored as it was
    kinds.unregister("DORA")
    try:
        with pytest.raises(AdapterFormatError, match="use_dora=True is not served"):
            read_adapter(dora_dirs["dora-a"], ModelArgs.from_dir(tiny_llama_dir), AdapterLimits(16, 32))
    finally:
        kinds._KINDS.clear()
        kinds._KINDS.update(before)
