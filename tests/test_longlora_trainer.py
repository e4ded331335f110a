"""Trainer --method longlora on the tiny model: the loss falls, the adapter records its RoPE factor and is read as
LONGLORA, and our engine equals its oracle (PeftModel on transformers' linear RoPE at that factor) at a context
past the base's; S2-Attn checked against a per-group loop (half-group offsets for half the heads, no wrap-around)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from server.__main__ import main as server_main
from server.adapters.peft_format import read_adapter
from server.config import AdapterLimits
from server.model.args import ModelArgs
from server.trainer.config import TrainConfig
from server.trainer.loop import train
from server.trainer.s2_attn import s2_attention
from tests.test_longlora import BASE_CONTEXT, assert_matches
from tests.test_model_parity import hf_model

SMALL = {"task": "topic", "n_train": 16, "n_test": 4, "batch_size": 8, "save_every": 0, "progress": False}


class _Mode(torch.nn.Module):
    pass


def _reference_s2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: int | None = None) -> torch.Tensor:
    """Per head: the sequence is cut in 4 groups of g; heads in the second half are cut at half-group offsets instead
    ([0, g/2), [g/2 + mg, g/2 + (m+1)g), no wrap-around); each query attends causally to the keys of its own group
    only (explicit loops, softmax by hand)."""
    b, h, t, d = q.shape
    g = g or t // 4
    out = torch.zeros(b, t, h, d)
    for head in range(h):
        shift = g // 2 if head >= h // 2 else 0
        for i in range(t):
            start = 0 if i < shift else shift + (i - shift) // g * g
            scores = q[:, head, i : i + 1] @ k[:, head, start : i + 1].transpose(1, 2) / d**0.5  # [b, 1, n]
            out[:, i, head] = (scores.softmax(-1) @ v[:, head, start : i + 1])[:, 0]
    return out


def _future_free(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """No output row reads a later position: changing the last token changes no earlier output (training mode)."""
    out, _ = s2_attention(_Mode().train(), q, k, v, None, scaling=0.3)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 5.0
    v2[:, :, -1] += 5.0
    out2, _ = s2_attention(_Mode().train(), q, k2, v2, None, scaling=0.3)
    return torch.equal(out[:, :-1], out2[:, :-1])


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
    assert _future_free(q, k, v)  # the paper's roll put a group's first tokens after the last ones: they saw them


def test_s2_attention_pads_lengths_that_are_not_a_multiple_of_four_and_repeats_kv_heads() -> None:
    g = torch.Generator().manual_seed(72)
    q = torch.randn(1, 4, 13, 8, generator=g)
    k, v = torch.randn(1, 2, 13, 8, generator=g), torch.randn(1, 2, 13, 8, generator=g)
    out, _ = s2_attention(_Mode().train(), q, k, v, None, scaling=8**-0.5)
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, 3))  # noqa: E731
    ref = _reference_s2(pad(q), pad(k.repeat_interleave(2, 1)), pad(v.repeat_interleave(2, 1)))[:, :13]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_s2_attention_gqa_heads_split_across_a_kv_group_odd_groups_and_gradients() -> None:
    """9 heads on 3 kv heads (the half split falls inside kv head 1, as on SmolLM2), groups of 5 (odd), and the
    gradients of q, k, v through the copies equal the loop's."""
    g = torch.Generator().manual_seed(73)
    q = torch.randn(2, 9, 20, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 3, 20, 8, generator=g, requires_grad=True) for _ in range(2))
    w = torch.randn(2, 20, 9, 8, generator=g)
    out, _ = s2_attention(_Mode().train(), q, k, v, None, scaling=8**-0.5)
    ref = _reference_s2(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert _future_free(q.detach(), k.detach(), v.detach())


def test_s2_attention_takes_its_group_size_from_the_model_config() -> None:
    """attach_longlora sets a quarter of the training context: a batch of 21 tokens at groups of 8 (3 groups, the
    last cut short), and a batch shorter than half a group is full causal attention."""
    g = torch.Generator().manual_seed(74)
    module = _Mode().train()
    module.config = type("Cfg", (), {"s2_group_size": 8})()
    q, k, v = (torch.randn(1, 4, 21, 8, generator=g) for _ in range(3))
    out, _ = s2_attention(module, q, k, v, None, scaling=8**-0.5)
    torch.testing.assert_close(out, _reference_s2(q, k, v, g=8), atol=1e-5, rtol=1e-5)
    for n in (3, 4):  # shorter than half a group (3), exactly half (4)
        short = [x[:, :, :n] for x in (q, k, v)]
        out, _ = s2_attention(module, *short, None, scaling=8**-0.5)
        full = torch.nn.functional.scaled_dot_product_attention(*short, is_causal=True).transpose(1, 2)
        torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)


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
    weights = read_adapter(cfg.output_dir, ModelArgs.from_dir(tiny_llama_dir), AdapterLimits(64, 128))
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
    assert read_adapter(out, ModelArgs.from_dir(tiny_llama_dir), AdapterLimits(64, 128)).kind == "LONGLORA"
