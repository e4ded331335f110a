"""One PEFT key parser (server/adapters/kinds/peft_keys.py), and each kind claims and checks its own keys from the
safetensors header: LoRA's matrices by the LoRA family, ia3_l by IA3, prompt_embeddings by the prompt-learning
kinds; no other module of server/ writes a PEFT key pattern of its own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.adapters import kinds
from server.adapters.kinds import AdapterFormatError, AdapterLimits, BaseModelMismatch
from server.adapters.kinds.peft_keys import ModuleKey, adapter_key, base_param_key, is_lora_matrix, module_key
from server.model.args import PROJECTIONS, ModelArgs

ROOT = Path(__file__).resolve().parents[1]
LIMITS = AdapterLimits(max_lora_rank=16, max_virtual_tokens=32, max_bottleneck_size=16)
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def test_keys_round_trip() -> None:
    for module in PROJECTIONS:
        for suffix in ("lora_A", "lora_B", "ia3_l", "lora_magnitude_vector"):
            parsed = module_key(adapter_key(3, module, suffix))
            assert parsed is not None and (parsed.layer, parsed.module, parsed.suffix) == (3, module, suffix)
            assert module_key(adapter_key(3, module, suffix).removesuffix(".weight")) == parsed
    assert module_key(f"{Q}.lora_C.weight") is None and module_key("model.layers.0.self_attn.q_proj.bias") is None
    assert base_param_key("model.layers.2.mlp.up_proj.bias") == ModuleKey(2, "mlp", "up_proj", "bias")
    assert is_lora_matrix(f"{Q}.lora_A.weight") and is_lora_matrix("anything.lora_B")
    assert not is_lora_matrix(f"{Q}.lora_magnitude_vector")


def _claims(key: str, shape: tuple[int, ...], args: ModelArgs) -> set[str]:
    return {k.name for k in kinds.registered() if k.check_tensor_header(key, shape, args, LIMITS)}


def test_each_kind_claims_its_own_keys(tiny_llama_dir: Path) -> None:
    args = ModelArgs.from_dir(tiny_llama_dir)
    n_in, n_out = args.projection_shape("q_proj")
    assert _claims(f"{Q}.lora_A.weight", (8, n_in), args) == {"LORA", "DORA", "LONGLORA"}
    assert _claims(f"{Q}.lora_B.weight", (n_out, 8), args) == {"LORA", "DORA", "LONGLORA"}
    assert _claims(f"{Q}.ia3_l", (n_out, 1), args) == {"IA3"}
    assert _claims(f"{Q}.lora_magnitude_vector", (n_out,), args) == {"DORA"}
    assert _claims("prompt_embeddings", (4, args.hidden_size), args) == {"PROMPT_TUNING", "P_TUNING",
                                                                         "PREFIX_TUNING"}
    assert _claims("base_model.model.model.layers.0.self_attn.q_proj.weight", (n_out, n_in), args) == set()


@pytest.mark.parametrize("kind, key, shape, error, message", [
    ("LORA", f"{Q}.lora_A.weight", (17, 64), AdapterFormatError, "exceeds the server's maximum rank 16"),
    ("LORA", f"{Q}.lora_A.weight", (0, 64), AdapterFormatError, "or is 0"),
    ("LORA", f"{Q}.lora_A.weight", (8, 64, 1), AdapterFormatError, "2-dimensional"),
    ("LORA", f"{Q}.lora_B.weight", (65, 8), BaseModelMismatch, "the base needs"),
    ("LORA", "base_model.model.model.layers.9.self_attn.q_proj.lora_A", (8, 64), BaseModelMismatch, "addresses layer"),
    ("LORA", "base_model.model.model.layers.0.mlp.q_proj.lora_A", (8, 64), AdapterFormatError, "unknown target"),
    ("IA3", f"{Q}.ia3_l", (65, 1), BaseModelMismatch, "the base needs"),
    ("PROMPT_TUNING", "prompt_embeddings", (33, 64), AdapterFormatError, "exceed the server's maximum"),
    ("PREFIX_TUNING", "prompt_embeddings", (4, 63), BaseModelMismatch, "neither the base hidden size"),
])
def test_a_kind_refuses_its_own_bad_keys(tiny_llama_dir: Path, kind: str, key: str, shape: tuple, error: type,
                                         message: str) -> None:
    with pytest.raises(error, match=message):
        kinds.by_name(kind).check_tensor_header(key, shape, ModelArgs.from_dir(tiny_llama_dir), LIMITS)


def test_no_other_module_parses_peft_keys() -> None:
    """PEFT's key grammar lives in peft_keys.py only (the AdapterHub bottleneck format has its own, not PEFT's)."""
    pattern = re.compile(r"re\.compile\([^)]*(base_model|lora_A|ia3_l|layernorm)")
    own = ROOT / "server/adapters/kinds/peft_keys.py"
    for path in sorted((ROOT / "server").rglob("*.py")):
        if path != own:
            assert not pattern.search(path.read_text()), f"{path} parses PEFT keys itself"
