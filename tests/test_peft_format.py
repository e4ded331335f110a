"""The PEFT reader: PEFT-made adapters load with the right scales and layouts; bad ones are refused
with a message that names the problem."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapters.peft_format import AdapterFormatError, read_adapter
from server.config import AdapterLimits
from server.model.args import ModelArgs
from tests.peft_adapters import ALL_PROJ, AdapterSpec, make_peft_adapter


@pytest.fixture(scope="module")
def made(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("made")
    specs = [AdapterSpec("lora", "lora", rank=4, alpha=8, targets=ALL_PROJ, seed=1),
             AdapterSpec("rslora", "lora", rank=4, alpha=8, rslora=True, seed=2),
             AdapterSpec("prefix", "prefix", n_virtual=3, seed=3), AdapterSpec("ia3", "ia3", seed=4),
             AdapterSpec("ptune", "p_tuning", n_virtual=4, seed=5)]
    return {s.name: make_peft_adapter(tiny_llama_dir, s, root / s.name) for s in specs}


def test_peft_made_adapters_load(made: dict[str, Path], tiny_llama_dir: Path) -> None:
    args = ModelArgs.from_dir(tiny_llama_dir)
    lora = read_adapter(made["lora"], args, AdapterLimits(64, 128))
    assert lora.kind == "LORA" and lora.payload.scale == 2.0 and len(lora.payload.a) == 7 * args.num_layers
    assert read_adapter(made["rslora"], args, AdapterLimits(64, 128)).payload.scale == pytest.approx(8 / math.sqrt(4))
    prefix = read_adapter(made["prefix"], args, AdapterLimits(64, 128)).payload
    assert prefix.keys.shape == (args.num_layers, 3, args.num_kv_heads, args.head_dim)
    raw = load_file(made["prefix"] / "adapter_model.safetensors")["prompt_embeddings"]
    view = raw.view(3, args.num_layers * 2, args.num_kv_heads, args.head_dim)
    assert torch.equal(prefix.keys[1], view[:, 2]) and torch.equal(prefix.values[1], view[:, 3])
    ia3 = read_adapter(made["ia3"], args, AdapterLimits(64, 128)).payload
    assert ia3.feedforward_modules == frozenset({"down_proj"})
    assert read_adapter(made["ptune"], args, AdapterLimits(64, 128)).payload.embeddings.shape == (4, args.hidden_size)


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(d: Path, fn) -> None:
    tensors = load_file(d / "adapter_model.safetensors")
    save_file({k: v.contiguous() for k, v in fn(tensors).items()}, d / "adapter_model.safetensors")


def _first(tensors: dict, word: str) -> str:
    return next(k for k in sorted(tensors) if word in k)


def _set(tensors: dict, key: str, value: torch.Tensor) -> dict:
    tensors[key] = value
    return tensors


BAD = [
    ("lora", lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
    ("lora", lambda d: ((d / "adapter_model.safetensors").rename(d / "adapter_model.bin")), "pickled"),
    ("lora", lambda d: (d / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    ("lora", lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    ("lora", lambda d: _edit_config(d, peft_type="LOHA"), "peft_type 'LOHA' is not served"),
    ("lora", lambda d: _edit_config(d, use_dora=True), "use_dora"),
    ("lora", lambda d: _edit_config(d, bias="all"), "bias"),
    ("lora", lambda d: _edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
    ("lora", lambda d: _edit_config(d, r=128), "exceeds the server's maximum rank"),
    ("lora", lambda d: (d / "adapter_model.safetensors").write_bytes(b"garbage"), "not a valid safetensors"),
    ("lora", lambda d: _edit_tensors(d, lambda t: _set(t, k := _first(t, "lora_A"), t[k] * float("nan"))), "NaN"),
    ("lora", lambda d: _edit_tensors(d, lambda t: _set(t, _first(t, "lora_A"), torch.zeros(4, 99))), "shape"),
    ("lora", lambda d: _edit_tensors(d, lambda t: _set(
        t, "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight", torch.zeros(4, 64))), "unknown target"),
    ("lora", lambda d: _edit_tensors(d, lambda t: _set(
        t, "base_model.model.lm_head.lora_A.weight", torch.zeros(4, 64))), "unexpected tensor"),
    ("lora", lambda d: _edit_tensors(d, lambda t: _set(
        t, _first(t, "lora_A").replace("layers.0.", "layers.77."), torch.zeros(4, 64))), "layer 77"),
    ("lora", lambda d: _edit_tensors(d, lambda t: {k: v for k, v in t.items() if k != _first(t, "lora_B")}),
     "lora_B"),
    ("prefix", lambda d: _edit_tensors(d, lambda t: {"prompt_embeddings": t["prompt_embeddings"][:, :10]}),
     "prefix width"),
    ("prefix", lambda d: _edit_config(d, num_virtual_tokens=1000), "does not match num_virtual_tokens"),
    ("ptune", lambda d: _edit_tensors(d, lambda t: {"prompt_embeddings": t["prompt_embeddings"][:, :5]}),
     "hidden size"),
    ("ia3", lambda d: _edit_tensors(d, lambda t: _set(t, _first(t, "down_proj"), torch.ones(64, 1))), "shape"),
]


@pytest.mark.parametrize(("source", "breaker", "words"), BAD, ids=[w for _, _, w in BAD])
def test_bad_adapters_are_refused_with_a_reason(made, tiny_llama_dir: Path, tmp_path: Path, source, breaker,
                                                words) -> None:
    d = tmp_path / "bad"
    shutil.copytree(made[source], d)
    breaker(d)
    with pytest.raises(AdapterFormatError, match=words):
        read_adapter(d, ModelArgs.from_dir(tiny_llama_dir), AdapterLimits(64, 128))
