"""Trainer --method dora / bitfit on the tiny model: the loss falls, the output is read by our server as the right
kind, and our engine's greedy completions equal the oracle's (PEFT's PeftModel for DoRA; transformers' model
carrying the saved biases for BitFit); the CLI accepts both methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from server.__main__ import main as server_main
from server.adapters.peft_format import read_adapter
from server.config import AdapterLimits
from server.model.args import ModelArgs
from server.trainer.base import load_base, load_tokenizer
from server.trainer.config import TrainConfig
from server.trainer.evaluate import engine_greedy, greedy_completions, max_new_tokens_for
from server.trainer.loop import load_splits, train
from server.trainer.methods import method_names
from tests.kinds_adapters import bottleneck_logits, with_biases

SMALL = {"task": "topic", "n_train": 16, "n_test": 6, "batch_size": 16, "save_every": 0, "progress": False}
KIND_OF = {"dora": "DORA", "bitfit": "BITFIT", "bottleneck": "BOTTLENECK", "longlora": "LONGLORA"}


class HookedOracle(torch.nn.Module):
    """Greedy decoding with the test's independent bottleneck implementation (full recompute each token)."""

    def __init__(self, base, adapter_dir: Path) -> None:
        super().__init__()
        self.base, self.adapter_dir = base, adapter_dir

    def generate(self, input_ids, max_new_tokens, eos_token_id, **_):
        rows = []
        for ids in input_ids.tolist():
            for _ in range(max_new_tokens):
                ids.append(int(bottleneck_logits(self.base, self.adapter_dir, ids)[-1].argmax()))
                if ids[-1] in eos_token_id:
                    break
            rows.append(ids + [eos_token_id[0]] * (input_ids.shape[1] + max_new_tokens - len(ids)))
        return torch.tensor(rows)


@pytest.mark.parametrize("method, extra", [("dora", {}), ("bitfit", {}), ("bottleneck", {"bottleneck": "pfeiffer"}),
                                           ("bottleneck", {"bottleneck": "houlsby", "non_linearity": "gelu"})],
                         ids=["dora", "bitfit", "bottleneck-pfeiffer", "bottleneck-houlsby-gelu"])
def test_kind_method_learns_and_is_served_like_its_oracle(method: str, extra: dict, tiny_llama_dir: Path,
                                                          tmp_path: Path) -> None:
    seed = int(torch.randint(0, 1000, ()))
    cfg = TrainConfig(method=method, output_dir=tmp_path / method, model=str(tiny_llama_dir), steps=8, seed=seed,
                      reduction_factor=8.0, **SMALL, **extra)
    result = train(cfg)
    first, last = sum(result.losses[:2]) / 2, sum(result.losses[-2:]) / 2
    assert last < first - 0.05, f"seed {seed}: {result.losses}"
    assert result.trainable_params > 0 and result.adapter_bytes > 0

    weights = read_adapter(cfg.output_dir, ModelArgs.from_dir(tiny_llama_dir), AdapterLimits(64, 128))
    assert weights.kind == KIND_OF[method]

    base = load_base(tiny_llama_dir, quantized=False)
    if method == "dora":
        assert json.loads((cfg.output_dir / "adapter_config.json").read_text())["use_dora"] is True
        oracle = PeftModel.from_pretrained(base, cfg.output_dir).eval()
    elif method == "bottleneck":
        assert (cfg.output_dir / "adapter.safetensors").is_file()
        assert not (cfg.output_dir / "adapter_model.safetensors").exists()
        oracle = HookedOracle(base.eval(), cfg.output_dir)
    else:
        saved = load_file(cfg.output_dir / "adapter_model.safetensors")
        assert len(saved) == 2 * 7 and all(t.abs().max() > 0 for t in saved.values()), "biases did not train"
        oracle = with_biases(base, saved).eval()
    tokenizer = load_tokenizer(tiny_llama_dir)
    _, test = load_splits(cfg, tokenizer)
    prompts = [e.prompt_ids for e in test]
    n = max_new_tokens_for(test)
    ours = engine_greedy(cfg.output_dir, prompts, n, model_path=str(tiny_llama_dir), quantize=False)
    theirs = greedy_completions(oracle, prompts, n, {tokenizer.eos_token_id}, tokenizer.pad_token_id)
    assert ours == theirs, f"seed {seed}"


def test_only_the_biases_train(tiny_llama_dir: Path) -> None:
    from server.trainer.bitfit import attach_bitfit

    model = attach_bitfit(load_base(tiny_llama_dir, quantized=False), ("q_proj", "down_proj"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all(n.endswith("bitfit_delta") for n in trainable)
    with pytest.raises(ValueError, match="not projections"):
        attach_bitfit(load_base(tiny_llama_dir, quantized=False), ("lm_head",))


def test_cli_trains_the_kind_methods(tiny_llama_dir: Path, tmp_path: Path) -> None:
    for method in method_names(plain_peft=False):  # dora, bitfit, bottleneck, longlora
        out = tmp_path / method
        argv = ["train", "--method", method, "--bottleneck", "houlsby", "--task", "topic", "--n-train", "8",
                "--n-test", "2", "--steps", "2", "--model", str(tiny_llama_dir), "--output-dir", str(out),
                "--no-progress", "--save-every", "0"]
        assert server_main(argv) == 0
        weights = read_adapter(out, ModelArgs.from_dir(tiny_llama_dir), AdapterLimits(64, 128))
        assert weights.kind == KIND_OF[method]
