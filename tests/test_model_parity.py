"""Our model and engine against transformers (the oracle), dense and NF4."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from server.config import EngineConfig, ModelConfig
from server.engine.engine import Engine
from tests.engine_utils import generate
from tests.model_utils import load, our_logits
from tests.tiny_models import make_tiny_model_dir

NF4_LOGIT_ATOL = 1e-4  # same NF4 codes and absmax, same fp32 dequant+matmul: equal up to summation order


def hf_model(path: Path, quantize: bool):
    if not quantize:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.float32, device_map="cpu")
    # On AVX512-BF16 CPUs bitsandbytes' Linear4bit repacks its weights at the first no-grad forward and
    # then runs a fused path with *bf16* absmax (logits move by up to ~0.035 on the tiny model). The NF4
    # format itself (QLoRA; what bnb computes with grad enabled, and on CUDA) dequantizes with fp32
    # absmax, which is what we serve, so the oracle is held to that exact path.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation: up to n tokens, ending with EOS if one is produced."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def random_prompts(n: int, vocab: int, seed: int, max_len: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


@pytest.fixture(scope="module", params=["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"])
def arch_dir(request, tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp(request.param), architecture=request.param,
                               tie_word_embeddings=request.param == "LlamaForCausalLM")


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_logits_match_transformers(arch_dir: Path, quantize: bool) -> None:
    loaded = load(arch_dir, quantize)
    ref_model = hf_model(arch_dir, quantize)
    for ids in random_prompts(3, loaded.args.vocab_size, seed=int(torch.randint(0, 10**6, ()))):
        ours = our_logits(loaded, ids)
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0].float()
        torch.testing.assert_close(ours, ref, atol=NF4_LOGIT_ATOL if quantize else 1e-5, rtol=1e-4)


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_loaded_weights_leave_the_checkpoint_map_aligned_and_still_tied(tiny_llama_dir: Path, quantize: bool) -> None:
    """settle_weights: every parameter and buffer 64-byte aligned, the tied LM head still the embedding, and the
    values those of the checkpoint (the logits test above checks the model as a whole)."""
    from safetensors.torch import load_file

    loaded = load(tiny_llama_dir, quantize)
    model = loaded.model
    assert all(t.data_ptr() % 64 == 0 for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head is model.embed_tokens
    ckpt = load_file(next(tiny_llama_dir.glob("*.safetensors")))
    assert torch.equal(model.embed_tokens, ckpt["model.embed_tokens.weight"])
    assert torch.equal(model.layers[0].input_layernorm.weight, ckpt["model.layers.0.input_layernorm.weight"])
    if not quantize:
        assert torch.equal(model.layers[1].mlp.down_proj.base.weight, ckpt["model.layers.1.mlp.down_proj.weight"])


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_greedy_batch_matches_transformers_generate(tiny_llama_dir: Path, quantize: bool) -> None:
    """8 prompts of different lengths, all in one engine batch, each equal to HF generate alone."""
    engine = Engine.create(ModelConfig(path=str(tiny_llama_dir), quantize=quantize), EngineConfig())
    engine.start()
    try:
        prompts = random_prompts(8, engine.args.vocab_size, seed=int(torch.randint(0, 10**6, ())))
        results = generate(engine, prompts, max_new_tokens=16)
    finally:
        engine.shutdown()
    ref_model = hf_model(tiny_llama_dir, quantize)
    for prompt, res in zip(prompts, results, strict=True):
        assert res.token_ids == hf_greedy(ref_model, prompt, 16)


DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Translate 'good morning' to Spanish.",
    "Why is the sky blue? Answer in one sentence.",
    "Name a famous physicist.",
    "What is 12 times 12?",
    "Give me a synonym for happy and explain the nuance between the two words in a short paragraph.",
]


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_default_model_greedy_matches_transformers(default_model_dir: Path, quantize: bool) -> None:
    engine = Engine.create(ModelConfig(quantize=quantize), EngineConfig())
    engine.start()
    tok = engine.tokenizer
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        for p in DEFAULT_PROMPTS
    ]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    try:
        results = generate(engine, prompts, max_new_tokens=12)
    finally:
        engine.shutdown()
    ref_model = hf_model(default_model_dir, quantize)
    for prompt, res in zip(prompts, results, strict=True):
        assert res.token_ids == hf_greedy(ref_model, prompt, 12)
