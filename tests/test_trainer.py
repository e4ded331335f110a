"""Trainer runs on a tiny random model: every method learns, its output loads in PEFT and in our server
(greedy parity with PEFT through the engine), a killed run resumes to the same weights, and the CLI."""

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
from server.trainer.checkpoint import CheckpointMismatch, latest_checkpoint
from server.trainer.config import TrainConfig
from server.trainer.evaluate import engine_greedy, greedy_completions, max_new_tokens_for
from server.trainer.loop import TrainingInterrupted, load_splits, train
from server.trainer.methods import method_names

SMALL = {"task": "topic", "n_train": 16, "n_test": 6, "batch_size": 4, "save_every": 0, "progress": False}


def _config(model_dir: Path, out: Path, method: str, **overrides) -> TrainConfig:
    return TrainConfig(method=method, output_dir=out, model=str(model_dir), **{**SMALL, "steps": 8, **overrides})


@pytest.mark.parametrize("method", method_names(plain_peft=True))  # PEFT loads them: its output is the oracle
def test_method_learns_and_output_is_served_like_peft(method: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    # every step sees all 16 rows, so the loss curve is not batch-to-batch noise
    cfg = _config(tiny_llama_dir, tmp_path / method, method, batch_size=16, seed=int(torch.randint(0, 1000, ())))
    result = train(cfg)
    first, last = sum(result.losses[:2]) / 2, sum(result.losses[-2:]) / 2
    assert last < first - 0.05, result.losses
    assert result.trainable_params > 0 and result.adapter_bytes > 0 and result.eval is not None
    assert "trained" in result.summary_line()

    # our reader accepts the directory unchanged
    args = ModelArgs.from_dir(tiny_llama_dir)
    weights = read_adapter(cfg.output_dir, args, AdapterLimits(max_lora_rank=64, max_virtual_tokens=128))
    assert weights.kind == json.loads((cfg.output_dir / "adapter_config.json").read_text())["peft_type"]

    # PEFT loads it; its greedy completions equal our engine's with the adapter registered in the pool
    quantized = method == "qlora"
    peft_model = PeftModel.from_pretrained(load_base(tiny_llama_dir, quantized=quantized), cfg.output_dir).eval()
    tokenizer = load_tokenizer(tiny_llama_dir)
    _, test = load_splits(cfg, tokenizer)
    prompts = [e.prompt_ids for e in test]
    n = max_new_tokens_for(test)
    ours = engine_greedy(cfg.output_dir, prompts, n, model_path=str(tiny_llama_dir), quantize=quantized)
    theirs = greedy_completions(peft_model, prompts, n, {tokenizer.eos_token_id}, tokenizer.pad_token_id)
    assert ours == theirs


def test_killed_run_resumes_to_the_same_adapter(tiny_llama_dir: Path, tmp_path: Path) -> None:
    full = train(_config(tiny_llama_dir, tmp_path / "full", "lora", steps=6))
    cfg = _config(tiny_llama_dir, tmp_path / "resumed", "lora", steps=6, save_every=2)
    with pytest.raises(TrainingInterrupted):
        train(cfg, stop_after=3)
    assert latest_checkpoint(cfg.output_dir).name == "step-000002"
    assert not (cfg.output_dir / "adapter_model.safetensors").exists()
    resumed = train(cfg)
    assert resumed.resumed_from == 2 and len(resumed.losses) == 4
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-5)
    a = load_file(full.output_dir / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # a rerun with more steps continues from the final checkpoint; other settings are refused
    longer = train(_config(tiny_llama_dir, tmp_path / "resumed", "lora", steps=7, save_every=2))
    assert longer.resumed_from == 6 and len(longer.losses) == 1
    with pytest.raises(CheckpointMismatch, match="other settings"):
        train(_config(tiny_llama_dir, tmp_path / "resumed", "lora", steps=8, lr=5e-3))


def test_cli_trains_and_reports_bad_data(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"Q: {i} plus one?\nA:", "completion": f" {i + 1}"} for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    out = tmp_path / "cli-out"
    common = ["--model", str(tiny_llama_dir), "--output-dir", str(out), "--no-progress", "--batch-size", "4"]
    assert server_main(["train", "--method", "ia3", "--data", str(data), "--steps", "3", "--eval-every", "2",
                        *common]) == 0
    captured = capsys.readouterr()
    assert "trained ia3: 3 steps" in captured.out and "step 2: eval_loss=" in captured.out
    history = json.loads((out / "train_summary.json").read_text())["history"]
    assert [h["step"] for h in history if "exact_match" in h] == [2, 3]
    assert f"{data}:13: invalid JSON" in captured.err
    assert (out / "adapter_config.json").is_file() and (out / "train_summary.json").is_file()

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    assert server_main(["train", "--method", "lora", "--data", str(bad), *common, "--overwrite"]) == 2
    assert f"{bad}:1: missing field 'completion'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: unknown method
        server_main(["train", "--method", "nope", "--data", str(bad), *common])


def test_upload_sends_the_adapter_to_a_running_server(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    from clients import SwitchboardClient
    from tests.server_utils import running_server

    out = tmp_path / "topic-ia3"
    with running_server(tiny_llama_dir, tenants=["acme"]) as server:
        argv = ["--method", "ia3", "--task", "topic", "--n-train", "16", "--n-test", "4", "--steps", "2",
                "--model", str(tiny_llama_dir), "--output-dir", str(out), "--no-progress", "--save-every", "1"]
        assert server_main(["train", *argv, "--upload", server.target, "--api-key", server.keys["acme"]]) == 0
        assert "uploaded topic-ia3 version 1" in capsys.readouterr().out
        with SwitchboardClient(server.target, server.keys["acme"]) as client:
            assert [a.name for a in client.list_adapters()] == ["topic-ia3"]
            assert client.generate("Sentence: Tom sang.\nTopic:", adapter="topic-ia3", max_new_tokens=3).token_ids
        # a failed upload (bad key) is reported; the trained adapter stays on disk
        assert server_main(["train", *argv, "--upload", server.target, "--api-key", "wrong"]) == 1
        assert "upload" in capsys.readouterr().err and (out / "adapter_model.safetensors").is_file()
