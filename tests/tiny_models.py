"""Tiny random Llama-family checkpoints for fast tests (no downloads).

They use the embedded default model's real tokenizer (vocab 49152, chat template) so that
tokenization, detokenization and chat templates are exercised for real, with a model small enough
that a forward pass takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_model_dir(
    out: Path,
    *,
    architecture: str = "LlamaForCausalLM",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 512,
    with_tokenizer: bool = True,
) -> Path:
    """Write a seeded random HF checkpoint (config.json + model.safetensors [+ tokenizer]) to `out`."""
    import transformers
    from transformers import AutoTokenizer

    from server.model.checkpoint import resolve_model_dir

    config_cls = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
    }[architecture]
    tok_dir = resolve_model_dir(None)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():  # larger-than-default weights so logits are not all near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif p.dim() == 1 and not p.eq(1).all():  # biases (Qwen2 q/k/v): non-zero too
                p.normal_(0.0, 0.02)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if with_tokenizer:
        tokenizer.save_pretrained(out)
    return out
