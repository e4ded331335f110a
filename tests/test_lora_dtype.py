"""`lora_dtype`: LoRA slot tables kept in bfloat16 on an fp32 model (vLLM's --lora-dtype), computed in fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.config import AdapterPoolConfig, ConfigError, EngineConfig, ModelConfig
from server.engine.engine import Engine
from server.serve_cli import configs, parse_args
from tests.oracle_parity import LOGIT_ATOL, assert_run_matches, oracle_for, run_mixed
from tests.peft_adapters import ALL_PROJ, AdapterSpec, make_peft_adapter

SPECS = [AdapterSpec("lora-a", "lora", rank=8, alpha=16, targets=ALL_PROJ, seed=11),
         AdapterSpec("lora-b", "lora", rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], seed=12)]


def bf16_exact(adapter_dir: Path) -> Path:
    """The adapter's weights rounded to bfloat16 (saved as fp32): stored in bf16 tables without loss."""
    path = adapter_dir / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16).float() for k, v in load_file(path).items()}, path)
    return adapter_dir


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bf16-lora")
    return {s.name: bf16_exact(make_peft_adapter(tiny_llama_dir, s, root / s.name)) for s in SPECS}


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_bf16_tables_match_peft(tiny_llama_dir: Path, adapters: dict[str, Path], quantize: bool) -> None:
    """bf16 tables hold bf16-exact adapters without loss, so the mixed batch must match PEFT's fp32 PeftModel as
    closely as fp32 tables do (the tables are read as bf16 and converted in registers)."""
    from tests.test_model_parity import hf_model

    run = run_mixed(tiny_llama_dir, adapters, [None, *adapters, *adapters], quantize, new_tokens=5,
                    lora_dtype="bfloat16")
    assert_run_matches(run, oracle_for(tiny_llama_dir, adapters, hf_model(tiny_llama_dir, quantize), quantize),
                       LOGIT_ATOL)


def test_bf16_tables_are_bf16_and_half_the_bytes(tiny_llama_dir: Path) -> None:
    sizes = {}
    for lora_dtype in ("auto", "bfloat16"):
        engine = Engine.create(ModelConfig(path=str(tiny_llama_dir), quantize=False), EngineConfig(),
                               AdapterPoolConfig(device_slots=2, max_lora_rank=8, lora_dtype=lora_dtype))
        tables = engine.pool.tables.by_kind["LORA"]
        tables._module("q_proj")
        a, b = tables.a["q_proj"], tables.b["q_proj"]
        assert a.dtype == b.dtype == (torch.float32 if lora_dtype == "auto" else torch.bfloat16)
        sizes[lora_dtype] = a.numel() * a.element_size() + b.numel() * b.element_size()
    assert sizes["bfloat16"] * 2 == sizes["auto"]


def test_lora_dtype_is_validated_and_reaches_the_cli() -> None:
    with pytest.raises(ConfigError, match="lora_dtype must be one of"):
        AdapterPoolConfig(lora_dtype="fp8")
    _, _, pool, _ = configs(parse_args(["--lora-dtype", "bfloat16"]))
    assert pool.lora_dtype == "bfloat16"
    assert configs(parse_args([]))[2].lora_dtype == "auto"
