"""LongLoRA served as a kind: PeftModel (LoRA + modules_to_save) on transformers' model with rope_type "linear"
at the adapter's factor is the oracle, on dense and NF4 bases; LongLoRA sequences at 2x the base's context in one
batch with base, LoRA and IA3 sequences; malformed LongLoRA files refused with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapters.kinds import AdapterFormatError, BaseModelMismatch
from server.adapters.kinds.lora_tables import LoraTables
from server.adapters.peft_format import read_adapter
from server.config import AdapterLimits
from server.model.args import ModelArgs
from tests.longlora_adapters import make_longlora_adapter, with_linear_rope
from tests.oracle_parity import LOGIT_ATOL, assert_run_matches, oracle_for, run_mixed
from tests.peft_adapters import ALL_PROJ, AdapterSpec, make_peft_adapter

NF4_ATOL = 2e-4  # both sides multiply by the same dequantized weights; summation order only
BASE_CONTEXT = 512  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def longlora_dirs(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("longlora")
    return {
        "ll-all": make_longlora_adapter(tiny_llama_dir, root / "all", rank=8, alpha=16, targets=["q_proj", "v_proj"],
                                        seed=61, factor=2.0),
        "ll-norms": make_longlora_adapter(tiny_llama_dir, root / "norms", rank=4, alpha=8, targets=ALL_PROJ, seed=62,
                                          factor=3.0, saved=["input_layernorm", "norm"]),
        "ll-embed": make_longlora_adapter(tiny_llama_dir, root / "embed", rank=4, alpha=4, targets=["k_proj", "o_proj"],
                                          seed=63, factor=None, saved=["embed_tokens", "post_attention_layernorm"]),
        "lora": make_peft_adapter(tiny_llama_dir, AdapterSpec("lora", "lora", rank=4, targets=ALL_PROJ, seed=64),
                                  root / "lora"),
        "ia3": make_peft_adapter(tiny_llama_dir, AdapterSpec("ia3", "ia3", seed=65), root / "ia3"),
    }


def assert_matches(model_dir: Path, adapters: dict[str, Path], routes: list[str | None], lengths: list[int],
                   quantize: bool, new_tokens: int, atol: float, max_model_len: int) -> None:
    from tests.test_model_parity import hf_model

    run = run_mixed(model_dir, adapters, routes, quantize, new_tokens, lengths, max_model_len=max_model_len)
    assert_run_matches(run, oracle_for(model_dir, adapters, hf_model(model_dir, quantize), quantize), atol)


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_longlora_at_2x_context_in_a_mixed_batch_matches_peft(tiny_llama_dir: Path, longlora_dirs: dict[str, Path],
                                                              quantize: bool) -> None:
    """LongLoRA prompts past the base's 512 positions (up to ~2x), base / LoRA / IA3 sequences short, one batch."""
    routes = [None, "ll-all", "ll-norms", "ll-embed", "lora", "ia3", "ll-all", None]
    lengths = [9, 2 * BASE_CONTEXT - 40, BASE_CONTEXT + 77, 300, 13, 5, 31, 2 * BASE_CONTEXT - 100]
    assert_matches(tiny_llama_dir, longlora_dirs, routes, lengths, quantize, new_tokens=4,
                   atol=NF4_ATOL if quantize else LOGIT_ATOL, max_model_len=2 * BASE_CONTEXT)


def test_norms_the_adapter_leaves_alone_keep_the_base_weights(tmp_path: Path) -> None:
    """On a base whose norm weights are not all ones: an adapter saving only the input norms (and one only the
    embedding) takes every other norm from the base (the tables' base rows), as PeftModel does."""
    from safetensors.torch import load_file as load
    from safetensors.torch import save_file as save

    from tests.tiny_models import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "base")
    weights = next(model_dir.glob("*.safetensors"))
    tensors = load(weights)
    g = torch.Generator().manual_seed(66)
    save({k: 1 + 0.5 * torch.randn(t.shape, generator=g) if "norm" in k else t for k, t in tensors.items()}, weights,
         metadata={"format": "pt"})
    made = {"ll-input": make_longlora_adapter(model_dir, tmp_path / "input", rank=4, alpha=8, targets=["q_proj"],
                                              seed=67, factor=2.0, saved=["input_layernorm"]),
            "ll-embed": make_longlora_adapter(model_dir, tmp_path / "embed", rank=4, alpha=8, targets=["v_proj"],
                                              seed=68, factor=None, saved=["embed_tokens"])}
    assert_matches(model_dir, made, [None, "ll-input", "ll-embed"], [7, BASE_CONTEXT + 30, 12], False, new_tokens=3,
                   atol=LOGIT_ATOL, max_model_len=2 * BASE_CONTEXT)


def test_the_oracle_really_interpolates(tiny_llama_dir: Path) -> None:
    """transformers' linear RoPE at factor 2 rotates position p as the default RoPE rotates p / 2."""
    from tests.test_model_parity import hf_model

    base = hf_model(tiny_llama_dir, False)
    scaled = with_linear_rope(base, 2.0)
    x = torch.zeros(1, 3, 8)
    cos2, _ = scaled.model.rotary_emb(x, torch.tensor([[0, 2, 10]]))
    cos1, _ = base.model.rotary_emb(x, torch.tensor([[0, 1, 5]]))
    torch.testing.assert_close(cos2, cos1)
    assert not torch.allclose(base.model.rotary_emb(x, torch.tensor([[0, 2, 10]]))[0], cos2)


def test_longlora_config_is_read_by_the_longlora_kind(tiny_llama_dir: Path, longlora_dirs: dict[str, Path]) -> None:
    args = ModelArgs.from_dir(tiny_llama_dir)
    weights = read_adapter(longlora_dirs["ll-all"], args, AdapterLimits(16, 32))
    assert weights.kind == "LONGLORA"
    described = weights.describe()
    assert described["rank"] == 8 and described["rope_factor"] == 2.0
    assert weights.payload.embed is not None and len(weights.payload.norms) == 2 * args.num_layers + 1
    norms_only = read_adapter(longlora_dirs["ll-norms"], args, AdapterLimits(16, 32)).payload
    saved_norms = [k for k in load_file(longlora_dirs["ll-norms"] / "adapter_model.safetensors") if "norm" in k]
    assert norms_only.embed is None and len(norms_only.norms) == len(saved_norms) > 0  # as PEFT matched the names
    assert read_adapter(longlora_dirs["lora"], args, AdapterLimits(16, 32)).kind == "LORA"


def test_fill_without_base_weights_is_refused(tiny_llama_dir: Path, longlora_dirs: dict[str, Path]) -> None:
    args = ModelArgs.from_dir(tiny_llama_dir)
    weights = read_adapter(longlora_dirs["ll-all"], args, AdapterLimits(16, 32))
    tables = LoraTables(args, 2, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="LongLoRA .* base model's weights"):
        tables.fill(0, weights.payload)
    assert tables.ranks == [0, 0] and tables.longlora.norm is None  # nothing half-filled


def _broken(src: Path, dst: Path, *, cfg: dict | None = None, drop: str | None = None,
            reshape: tuple[str, tuple[int, ...]] | None = None, add: dict | None = None) -> Path:
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
    tensors.update(add or {})
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize("case, changes, error, message", [
    ("lm-head", {"cfg": {"modules_to_save": ["embed_tokens", "lm_head"]}}, AdapterFormatError, "lm_head"),
    ("dynamic-rope", {"cfg": {"rope_scaling": {"rope_type": "dynamic", "factor": 2}}}, AdapterFormatError,
     "only 'linear'"),
    ("shrinking-factor", {"cfg": {"rope_scaling": {"rope_type": "linear", "factor": 0.5}}}, AdapterFormatError,
     "must be >= 1"),
    ("huge-factor", {"cfg": {"rope_scaling": {"rope_type": "linear", "factor": 1e9}}}, AdapterFormatError,
     "out of range"),
    ("rope-not-object", {"cfg": {"rope_scaling": "linear"}}, AdapterFormatError, "must be an object"),
    ("embed-missing", {"drop": "embed_tokens"}, AdapterFormatError, "embed_tokens"),
    ("embed-wrong-vocab", {"reshape": ("embed_tokens", (100, 64))}, BaseModelMismatch, "the base's table"),
    ("norm-matrix", {"reshape": ("layers.0.input_layernorm", (64, 2))}, AdapterFormatError, "vector"),
    ("norm-wrong-width", {"reshape": ("model.norm.weight", (65,))}, BaseModelMismatch, "hidden size"),
    ("norm-past-last-layer", {"add": {"base_model.model.model.layers.9.input_layernorm.weight": torch.ones(64)}},
     BaseModelMismatch, "layers"),
])
def test_malformed_longlora_is_refused(tiny_llama_dir: Path, longlora_dirs: dict[str, Path], tmp_path: Path,
                                       case: str, changes: dict, error: type, message: str) -> None:
    dst = _broken(longlora_dirs["ll-all"], tmp_path / case, **changes)
    with pytest.raises(error, match=message):
        read_adapter(dst, ModelArgs.from_dir(tiny_llama_dir), AdapterLimits(16, 32))
