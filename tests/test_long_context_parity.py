"""Long prompts through the engine, prefilled in chunks that attend to earlier cached chunks (the flash-kernel
chunk path of kernels/attention.py and the compiled kernel for short chunks and decodes), against transformers.

Prompt lengths 1..4,000 in one batch with a small token budget, so every long prompt is split into chunks of
hundreds of rows over a past of hundreds to thousands, next to decodes of sequences that finished theirs. The
oracle is transformers on each prompt alone: the first sampled token's logits, then greedy continuations.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from server.config import EngineConfig, ModelConfig
from server.engine.engine import Engine
from tests.engine_utils import generate
from tests.tiny_models import make_tiny_model_dir

LENGTHS = [4000, 1, 17, 700, 2100, 64]


@pytest.fixture(scope="module")
def long_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-4k"), heads=6, kv_heads=2, hidden=96,
                               max_position_embeddings=4096)


@pytest.mark.parametrize("budget", [512, 1000])
def test_chunked_long_prompts_match_transformers(long_llama_dir: Path, budget: int) -> None:
    seed = int(os.environ.get("SEED") or np.random.SeedSequence().entropy % 10**9)
    g = torch.Generator().manual_seed(seed)
    engine = Engine.create(ModelConfig(path=str(long_llama_dir), quantize=False),
                           EngineConfig(max_batch_tokens=budget, kv_blocks=700))
    vocab = engine.args.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENGTHS]
    first_logits: dict[int, torch.Tensor] = {}  # prompt index (tests.engine_utils ids: req-<i>-...) -> logits

    def keep_first(seqs, logits) -> None:
        for seq, row in zip(seqs, logits, strict=True):
            first_logits.setdefault(int(seq.request_id.split("-")[1]), row.clone())

    engine.on_logits = keep_first
    engine.start()
    try:
        results = generate(engine, prompts, max_new_tokens=4, ignore_eos=True)
    finally:
        engine.shutdown()
    assert len(first_logits) == len(prompts)
    model = AutoModelForCausalLM.from_pretrained(long_llama_dir, dtype=torch.float32).eval()
    why = f"seed={seed} budget={budget}"
    for i, (prompt, res) in enumerate(zip(prompts, results, strict=True)):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = model(ids).logits[0, -1].float()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                                 do_sample=False, pad_token_id=0)
        where = f"len={len(prompt)} {why}"
        torch.testing.assert_close(first_logits[i], ref, atol=1e-4, rtol=1e-4, msg=lambda m, w=where: f"{m}\n{w}")
        assert res.token_ids == out[0, len(prompt):].tolist(), f"greedy tokens differ at len={len(prompt)}; {why}"
