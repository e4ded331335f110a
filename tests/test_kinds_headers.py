"""The new kinds answer the safetensors-header check (AdapterKind.check_tensor_header, called by the header
validation before any tensor is read): every tensor of a good file is claimed, bad shapes are refused, and
keys of other kinds are not claimed."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from server.adapters import kinds
from server.adapters.kinds import AdapterFormatError, AdapterLimits, BaseModelMismatch
from server.model.args import ModelArgs
from tests.kinds_adapters import HOULSBY, make_bitfit_adapter, make_dora_adapter, write_bottleneck_adapter
from tests.peft_adapters import ALL_PROJ

LIMITS = AdapterLimits(max_lora_rank=16, max_virtual_tokens=32, max_bottleneck_size=16)


def test_every_tensor_of_a_good_file_is_claimed_by_its_kind(tiny_llama_dir: Path, tmp_path: Path) -> None:
    args = ModelArgs.from_dir(tiny_llama_dir)
    files = {
        "DORA": make_dora_adapter(tiny_llama_dir, tmp_path / "d", rank=4, alpha=8, targets=ALL_PROJ, seed=1)
        / "adapter_model.safetensors",
        "BITFIT": make_bitfit_adapter(tiny_llama_dir, tmp_path / "b", targets=ALL_PROJ, seed=2)
        / "adapter_model.safetensors",
        "BOTTLENECK": write_bottleneck_adapter(tiny_llama_dir, tmp_path / "n", HOULSBY, seed=3) / "adapter.safetensors",
    }
    for name, path in files.items():
        kind = kinds.by_name(name)
        for key, t in load_file(path).items():
            if "lora_A" in key or "lora_B" in key:  # claimed by every LoRA-family kind (tests/test_peft_keys.py)
                continue
            assert kind.check_tensor_header(key, tuple(t.shape), args, LIMITS), (name, key)
            others = [k.name for k in kinds.registered() if k.name != name and
                      k.check_tensor_header(key, tuple(t.shape), args, LIMITS)]
            assert not others, (key, others)


@pytest.mark.parametrize("kind, key, shape, error", [
    ("DORA", "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", (65,), BaseModelMismatch),
    ("DORA", "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", (64, 1), AdapterFormatError),
    ("DORA", "base_model.model.model.layers.9.self_attn.q_proj.lora_magnitude_vector", (64,), BaseModelMismatch),
    ("BITFIT", "model.layers.0.mlp.up_proj.bias", (64,), BaseModelMismatch),
    ("BITFIT", "model.layers.0.mlp.q_proj.bias", (64,), AdapterFormatError),
    ("BITFIT", "model.layers.0.mlp.up_proj.bias", (128, 1), AdapterFormatError),
    ("BOTTLENECK", "model.layers.0.output_adapters.adapters.x.adapter_down.0.weight", (17, 64), AdapterFormatError),
    ("BOTTLENECK", "model.layers.0.output_adapters.adapters.x.adapter_up.weight", (32, 4), AdapterFormatError),
    ("BOTTLENECK", "model.layers.5.output_adapters.adapters.x.adapter_up.bias", (64,), BaseModelMismatch),
    ("LONGLORA", "base_model.model.model.embed_tokens.weight", (49152, 65), BaseModelMismatch),
    ("LONGLORA", "base_model.model.model.embed_tokens.weight", (49152,), AdapterFormatError),
    ("LONGLORA", "base_model.model.model.norm.weight", (64, 1), AdapterFormatError),
    ("LONGLORA", "base_model.model.model.layers.2.input_layernorm.weight", (64,), BaseModelMismatch),
])
def test_bad_header_shapes_are_refused(tiny_llama_dir: Path, kind: str, key: str, shape: tuple, error: type) -> None:
    with pytest.raises(error):
        kinds.by_name(kind).check_tensor_header(key, shape, ModelArgs.from_dir(tiny_llama_dir), LIMITS)
