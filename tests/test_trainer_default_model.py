"""The default model (SmolLM2-135M-Instruct): a short LoRA run on the shipped `topic` task beats the base
model's zero-shot exact-match on held-out rows, and our engine serves the trained adapter with the same
greedy completions as PEFT. (All six methods: bench/methods.py, figures in bench/RESULTS.md.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from server.trainer.base import load_base, load_tokenizer
from server.trainer.config import TrainConfig
from server.trainer.evaluate import engine_greedy, evaluate, max_new_tokens_for
from server.trainer.loop import load_splits, train


@pytest.mark.slow
def test_lora_beats_zero_shot_and_is_served_like_peft(default_model_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(method="lora", output_dir=tmp_path / "lora", task="topic", n_train=32, n_test=12, steps=8,
                      save_every=0, progress=False)
    tokenizer = load_tokenizer(default_model_dir)
    _, test = load_splits(cfg, tokenizer)
    zero_shot = evaluate(load_base(default_model_dir, quantized=False), tokenizer, test, with_loss=False)
    result = train(cfg)
    assert result.eval.exact_match >= zero_shot.exact_match + 0.25, (zero_shot.completions, result.eval.completions)
    served = engine_greedy(cfg.output_dir, [e.prompt_ids for e in test], max_new_tokens_for(test), model_path=None,
                           quantize=False)
    assert served == result.eval.token_ids
