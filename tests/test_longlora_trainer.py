"""Trainer --method longlora on the tiny model: the loss falls, the adapter records its RoPE factor and is read as
LONGLORA, and our engine equals its oracle (PeftModel on transformers' linear RoPE at that factor) at a context
past the base's; S2-Attn checked against a per-group loop written from the paper's description."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from server.__main__ import main as server_main
from server.adapters.peft_format import read_adapter
from server.model.args import ModelArgs
from server.trainer.config import TrainConfig
from server.trainer.longlora import s2_attention
from server.trainer.loop import train
from tests.test_longlora import BASE_CONTEXT, assert_matches
from tests.test_model_parity import hf_model

SMALL = {"task": "topic", "n_train": 16, "n_test": 4, "batch_size": 8, "save_every": 0, "progress": False}


class _Mode(torch.nn.Module):
    pass


def _reference_s2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per head: heads in the second half see the sequence rolled left by half a group; the sequence is cut in 4
    groups; each query attends causally to the keys of its own group only (explicit loops, softmax by hand)."""
    b, h, t, d = q.shape
    g = t // 4
    out = torch.zeros(b, t, h, d)
    for head in range(h):
        shift = g // 2 if head >= h // 2 else 0
        qs, ks, vs = (x[:, head].roll(-shift, dims=1) for x in (q, k, v))
        o = torch.zeros(b, t, d)
        for i in range(t):
            start = (i // g) * g
            scores = qs[:, i : i + 1] @ ks[:, start : i + 1].transpose(1, 2) / d**0.5  # [b, 1, n]
            o[:, i] = (scores.softmax(-1) @ vs[:, start : i + 1])[:, 0]
        out[:, :, head] = o.roll(shift, dims=1)
    return out


def test_s2_attention_is_grouped_and_shifted_in_training_and_full_in_eval() -> None:
    g = torch.Generator().manual_seed(71)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g) for _ in range(3))
    module = _Mode().train()
    out, _ = s2_attention(module, q, k, v, None, scaling=8**-0.5)
    torch.testing.assert_close(out, _reference_s2(q, k, v), atol=1e-5, rtol=1e-5)
    module.eval()
    full, _ = s2_attention(module, q, k, v, None, scaling=8**-0.5)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-5)
    assert (out - full).abs().max() > 1e-2  # the training pattern really differs from full attention


def test_s2_attention_pads_lengths_that_are_not_a_multiple_of_four_and_repeats_kv_heads() -> None:
    g = torch.Generator().manual_seed(72)
    q = torch.randn(1, 4, 13, 8, generator=g)
    k, v = torch.randn(1, 2, 13, 8, generator=g), torch.randn(1, 2, 13, 8, generator=g)
    out, _ = s2_attention(_Mode().train(), q, k, v, None, scaling=8**-0.5)
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, 3))  # noqa: E731
    ref = _reference_s2(pad(q), pad(k.repeat_interleave(2, 1)), pad(v.repeat_interleave(2, 1)))[:, :13]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_longlora_learns_and_is_served_like_its_oracle(tiny_llama_dir: Path, tmp_path: Path) -> None:
    seed = int(torch.randint(0, 1000, ()))
    cfg = TrainConfig(method="longlora", output_dir=tmp_path / "ll", model=str(tiny_llama_dir), steps=8, seed=seed,
                      rope_factor=2.0, **SMALL)
    result = train(cfg)
    first, last = sum(result.losses[:2]) / 2, sum(result.losses[-2:]) / 2
    assert last < first - 0.05, f"seed {seed}: {result.losses}"
    config = json.loads((cfg.output_dir / "adapter_config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    saved = load_file(cfg.output_dir / "adapter_model.safetensors")
    base = hf_model(tiny_llama_dir, False)
    assert not torch.equal(saved["base_model.model.model.embed_tokens.weight"], base.model.embed_tokens.weight)
    assert not torch.equal(saved["base_model.model.model.norm.weight"], base.model.norm.weight), "norms did not train"
    weights = read_adapter(cfg.output_dir, ModelArgs.from_dir(tiny_llama_dir), 64, 128)
    assert weights.kind == "LONGLORA" and weights.payload.factor == 2.0
    assert_matches(tiny_llama_dir, {"ll-trained": cfg.output_dir}, [None, "ll-trained", "ll-trained"],
                   [9, 2 * BASE_CONTEXT - 30, 20], False, new_tokens=3, atol=2e-4, max_model_len=2 * BASE_CONTEXT)


def test_cli_trains_longlora(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    argv = ["train", "--method", "longlora", "--rope-factor", "4", "--task", "topic", "--n-train", "8", "--n-test",
            "2", "--steps", "2", "--batch-size", "4", "--save-every", "0", "--model", str(tiny_llama_dir),
            "--output-dir", str(out), "--no-progress"]
    assert server_main(argv) == 0
    assert json.loads((out / "adapter_config.json").read_text())["rope_scaling"]["factor"] == 4.0
    assert read_adapter(out, ModelArgs.from_dir(tiny_llama_dir), 64, 128).kind == "LONGLORA"
