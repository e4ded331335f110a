"""The frozen base model the trainer adapts: transformers' model, dense fp32 or bitsandbytes NF4 (QLoRA).

The NF4 settings are the server's (server/model/quant.py): blocksize 64, fp32 compute, double
quantization only where bitsandbytes has it (CUDA). So an adapter trained on this base is trained on the
very weights the server multiplies by.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from server.model.quant import NF4_BLOCKSIZE, _bnb


def load_tokenizer(model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(model_dir: Path, *, quantized: bool, device: str = "cpu"):
    """transformers' causal LM with every base parameter frozen; NF4 linear layers when `quantized`."""
    if not quantized:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    else:
        _bnb()  # quiets bitsandbytes' optional-kernel warning on CPU
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               bnb_4bit_use_double_quant=device.startswith("cuda"))
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.float32,
                                                     device_map=device)
        for module in model.modules():
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            if state is not None and state.blocksize != NF4_BLOCKSIZE:
                raise RuntimeError(f"bitsandbytes quantized with blocksize {state.blocksize}; "
                                   f"the server uses {NF4_BLOCKSIZE}")
            # bitsandbytes' fused CPU path (AVX512-BF16) rounds absmax to bf16 at no-grad forwards; the server
            # dequantizes with fp32 absmax, so evaluation is held to that path (see tests/test_model_parity.py)
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model
