"""Adapters made by PEFT itself, with random non-zero weights, saved in PEFT's format (test oracle side)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from transformers import AutoModelForCausalLM

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class AdapterSpec:
    name: str
    kind: str  # lora | prompt | p_tuning | prefix | ia3
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    rslora: bool = False
    n_virtual: int = 5
    seed: int = 0


def peft_config(spec: AdapterSpec):
    if spec.kind == "lora":
        return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=spec.targets, use_rslora=spec.rslora,
                          lora_dropout=0.0, task_type="CAUSAL_LM")
    if spec.kind == "prompt":
        return PromptTuningConfig(num_virtual_tokens=spec.n_virtual, task_type="CAUSAL_LM")
    if spec.kind == "p_tuning":
        return PromptEncoderConfig(num_virtual_tokens=spec.n_virtual, encoder_hidden_size=32, task_type="CAUSAL_LM")
    if spec.kind == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=spec.n_virtual, task_type="CAUSAL_LM")
    if spec.kind == "ia3":
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                         task_type="CAUSAL_LM")
    raise ValueError(spec.kind)


def make_peft_adapter(base_dir: Path, spec: AdapterSpec, out: Path) -> Path:
    """Create the adapter with PEFT, randomize every trainable tensor (no zero-initialised B), save it."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, peft_config(spec))
    g = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if "ia3_l" in name:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:  # prompt / prefix embeddings and the P-tuning encoder
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out


def peft_logits(base_dir: Path, adapter_dir: Path, ids: list[int], quantize: bool = False,
                base: torch.nn.Module | None = None) -> torch.Tensor:
    """PEFT's logits [len(ids), vocab] for the real tokens (virtual-token positions dropped).

    quantize: the base is transformers' model quantized with bitsandbytes NF4 (tests.test_model_parity.hf_model).
    base: that model already loaded (a deep copy is adapted, so one load serves many adapters).
    """
    import copy

    from tests.test_model_parity import hf_model

    base = copy.deepcopy(base) if base is not None else hf_model(base_dir, quantize)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
    return logits[0, -len(ids):].float()
