"""PEFT parity: one mixed batch of base, LoRA, prompt, P-tuning, prefix and IA3 sequences, each compared
with PEFT's PeftModel for that one adapter on the same base weights (the oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams
from tests.engine_utils import collect
from tests.peft_adapters import ALL_PROJ, AdapterSpec, make_peft_adapter, peft_logits

LOGIT_ATOL = 2e-4  # fp32, dense base; differences are summation order only

SPECS = [
    AdapterSpec("lora-a", "lora", rank=8, alpha=16, targets=["q_proj", "v_proj"], seed=1),
    AdapterSpec("lora-b", "lora", rank=4, alpha=8, targets=ALL_PROJ, seed=2),
    AdapterSpec("lora-rs", "lora", rank=16, alpha=4, targets=["k_proj", "o_proj", "up_proj", "down_proj"],
                rslora=True, seed=3),
    AdapterSpec("prompt-a", "prompt", n_virtual=4, seed=4),
    AdapterSpec("prompt-b", "prompt", n_virtual=7, seed=5),
    AdapterSpec("ptune", "p_tuning", n_virtual=6, seed=6),
    AdapterSpec("prefix-a", "prefix", n_virtual=3, seed=7),
    AdapterSpec("prefix-b", "prefix", n_virtual=9, seed=8),
    AdapterSpec("ia3-a", "ia3", seed=9),
    AdapterSpec("ia3-b", "ia3", seed=10),
]


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft-adapters")
    return {s.name: make_peft_adapter(tiny_llama_dir, s, root / s.name) for s in SPECS}


def run_mixed_batch(model_dir: Path, adapters: dict[str, Path], quantize: bool, new_tokens: int):
    engine = Engine.create(ModelConfig(path=str(model_dir), quantize=quantize), EngineConfig(),
                           AdapterPoolConfig(device_slots=16, max_lora_rank=16))
    for name, path in adapters.items():
        engine.pool.register(name, path)
    seen: dict[str, list[torch.Tensor]] = {}
    engine.on_logits = lambda seqs, logits: [seen.setdefault(s.request_id, []).append(logits[i].clone())
                                              for i, s in enumerate(seqs)]
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    routes = [None, None, *adapters]  # two base-model sequences + one per adapter = 12
    prompts = [torch.randint(0, engine.args.vocab_size, (int(torch.randint(2, 20, (1,), generator=g)),),
                             generator=g).tolist() for _ in routes]
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        handles = [engine.submit(GenerationRequest(f"mix-{i}", tuple(p), params, adapter=a))
                   for i, (p, a) in enumerate(zip(prompts, routes, strict=True))]
        outputs = [collect(h).token_ids for h in handles]
    finally:
        engine.shutdown()
    return routes, prompts, outputs, [seen[f"mix-{i}"] for i in range(len(routes))]


def assert_batch_matches_peft(model_dir: Path, adapters: dict[str, Path], quantize: bool, new_tokens: int,
                              atol: float = LOGIT_ATOL) -> None:
    """Run the mixed batch through our engine; every sequence's logits at every step equal PeftModel's for its
    adapter (transformers alone for base-model sequences), and the greedy continuations agree."""
    from tests.test_model_parity import hf_model

    routes, prompts, outputs, step_logits = run_mixed_batch(model_dir, adapters, quantize, new_tokens)
    base = hf_model(model_dir, quantize)
    for route, prompt, out, logits in zip(routes, prompts, outputs, step_logits, strict=True):
        full = prompt + out
        if route is None:
            with torch.no_grad():
                ref = base(torch.tensor([full])).logits[0]
        else:
            ref = peft_logits(model_dir, adapters[route], full, quantize, base=base)
        # our logits at step k predict token k; the oracle's at position len(prompt)-1+k (teacher forcing
        # on our own tokens); argmax agreement = the greedy continuations agree
        ours = torch.stack(logits)
        expected = ref[len(prompt) - 1 : len(prompt) - 1 + len(out)]
        torch.testing.assert_close(ours, expected, atol=atol, rtol=1e-4, msg=lambda m, r=route: f"{r}: {m}")
        assert out == expected.argmax(-1).tolist(), route


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_mixed_batch_matches_peft_per_adapter(tiny_llama_dir: Path, adapters: dict[str, Path], quantize: bool) -> None:
    assert_batch_matches_peft(tiny_llama_dir, adapters, quantize, new_tokens=6)


@pytest.mark.slow
def test_default_model_mixed_batch_matches_peft(default_model_dir: Path, tmp_path: Path) -> None:
    """The same 12-sequence mixed batch on the embedded SmolLM2-135M (30 layers, dense fp32). Over 30 layers
    fp32 summation-order differences reach ~1e-4 on logits of magnitude ~20, hence the wider tolerance."""
    made = {s.name: make_peft_adapter(default_model_dir, s, tmp_path / s.name) for s in SPECS}
    assert_batch_matches_peft(default_model_dir, made, quantize=False, new_tokens=3, atol=2e-3)


def test_mixed_batch_with_triton_kernels_matches_peft(tiny_llama_dir: Path, adapters: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The same mixed batch with the LoRA path forced through the Triton SGMV kernels (interpreted on CPU)."""
    monkeypatch.setattr("kernels.MODE", "triton")  # SWITCHBOARD_KERNELS is read once, at import
    lora = {k: v for k, v in adapters.items() if k.startswith("lora")}
    routes, prompts, outputs, step_logits = run_mixed_batch(tiny_llama_dir, lora, False, new_tokens=3)
    for route, prompt, out, logits in zip(routes, prompts, outputs, step_logits, strict=True):
        if route is None:
            continue
        ref = peft_logits(tiny_llama_dir, lora[route], prompt + out)
        expected = ref[len(prompt) - 1 : len(prompt) - 1 + len(out)]
        torch.testing.assert_close(torch.stack(logits), expected, atol=LOGIT_ATOL, rtol=1e-4)
