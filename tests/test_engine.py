"""Engine behaviour on a tiny random model: continuous batching, sampling, stops, limits, bad input."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from server.config import EngineConfig, ModelConfig
from server.engine.engine import Engine
from server.engine.request import (
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    QueueFull,
    SamplingParams,
)
from server.engine.sequence import IncrementalDetokenizer
from tests.engine_utils import collect, generate


def make_engine(model_dir: Path, **cfg) -> Engine:
    engine = Engine.create(ModelConfig(path=str(model_dir), quantize=False), EngineConfig(**cfg))
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path):
    eng = make_engine(tiny_llama_dir)
    yield eng
    eng.shutdown()


def prompts_of(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def test_batch_invariance_with_staggered_joins(engine: Engine) -> None:
    """A sequence's greedy output alone equals its output among 16 of mixed lengths joining at different steps."""
    seed = int(torch.randint(0, 10**6, ()))
    prompts = prompts_of([1, 3, 5, 8, 13, 21, 34, 55, 2, 4, 6, 9, 17, 30, 44, 70], engine.args.vocab_size, seed)
    alone = [generate(engine, [p], max_new_tokens=20, ignore_eos=True)[0].token_ids for p in prompts]
    handles = []
    for i, p in enumerate(prompts):
        handles.append(engine.submit(GenerationRequest(f"stagger-{i}", tuple(p), SamplingParams(20, ignore_eos=True))))
        if i % 4 == 3:  # later groups join while earlier ones are decoding
            steps = engine.steps
            while engine.steps < steps + 3:
                time.sleep(0.001)
    together = [collect(h).token_ids for h in handles]
    assert together == alone


def test_chunked_prefill_and_preemption_keep_outputs(tiny_llama_dir: Path, engine: Engine) -> None:
    """A tiny token budget (chunked prefill) and a KV budget too small for all sequences (preemption)."""
    prompts = prompts_of([40, 33, 25, 50, 12, 7], engine.args.vocab_size, seed=int(torch.randint(0, 10**6, ())))
    expected = [r.token_ids for r in generate(engine, prompts, max_new_tokens=24, ignore_eos=True)]
    small = make_engine(tiny_llama_dir, max_batch_tokens=16, kv_blocks=12, kv_block_size=8)
    try:
        got = [r.token_ids for r in generate(small, prompts, max_new_tokens=24, ignore_eos=True)]
        assert small.scheduler.preemptions > 0
        assert small.stats().kv_blocks_used == 0
    finally:
        small.shutdown()
    assert got == expected


def test_seeded_sampling_is_reproducible_and_batch_independent(engine: Engine) -> None:
    p = prompts_of([9], engine.args.vocab_size, seed=3)[0]
    params = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    a = generate(engine, [p], **params)[0].token_ids
    others = prompts_of([5, 17, 30], engine.args.vocab_size, seed=4)
    b = generate(engine, [*others, p], **params)[3].token_ids
    c = generate(engine, [p], **{**params, "seed": 99})[0].token_ids
    assert a == b
    assert a != c


def test_top_k_one_and_tiny_top_p_are_greedy(engine: Engine) -> None:
    p = prompts_of([11], engine.args.vocab_size, seed=5)[0]
    greedy = generate(engine, [p], max_new_tokens=12, ignore_eos=True)[0].token_ids
    assert generate(engine, [p], max_new_tokens=12, temperature=1.5, top_k=1, ignore_eos=True)[0].token_ids == greedy
    assert generate(engine, [p], max_new_tokens=12, temperature=1.5, top_p=1e-6, ignore_eos=True)[0].token_ids == greedy


def test_stop_string_cuts_text(engine: Engine) -> None:
    p = prompts_of([6], engine.args.vocab_size, seed=6)[0]
    full = generate(engine, [p], max_new_tokens=24, ignore_eos=True)[0]
    assert len(full.text) > 6
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = generate(engine, [p], max_new_tokens=24, ignore_eos=True, stop=(stop,))[0]
    assert cut.finish_reason is FinishReason.STOP
    assert cut.text == full.text[: full.text.index(stop)]


def test_max_new_tokens_and_length_reason(engine: Engine) -> None:
    p = prompts_of([4], engine.args.vocab_size, seed=7)[0]
    r = generate(engine, [p], max_new_tokens=5, ignore_eos=True)[0]
    assert len(r.token_ids) == 5 and r.finish_reason is FinishReason.LENGTH


def test_abort_frees_kv(engine: Engine) -> None:
    p = prompts_of([20], engine.args.vocab_size, seed=8)[0]
    h = engine.submit(GenerationRequest("to-abort", tuple(p), SamplingParams(max_new_tokens=4000, ignore_eos=True)))
    h.get(timeout=60)
    engine.abort("to-abort")
    assert collect(h).finish_reason is FinishReason.ABORT
    deadline = time.monotonic() + 10
    while engine.stats().kv_blocks_used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().kv_blocks_used == 0


BAD_REQUESTS = [
    ((), SamplingParams(), "empty"),
    ((1, 2), SamplingParams(max_new_tokens=0), "max_new_tokens"),
    ((1, 2), SamplingParams(max_new_tokens=-3), "max_new_tokens"),
    ((1, 2), SamplingParams(max_new_tokens=10**9), "max_new_tokens"),
    ((1, 2), SamplingParams(top_p=0.0), "top_p"),
    ((1, 2), SamplingParams(top_p=1.5), "top_p"),
    ((1, 2), SamplingParams(temperature=-1.0), "temperature"),
    ((1, 2), SamplingParams(temperature=float("nan")), "temperature"),
    ((1, 2), SamplingParams(top_k=-1), "top_k"),
    ((1, 2), SamplingParams(seed=-5), "seed"),
    ((1, 2), SamplingParams(stop=("",)), "stop"),
    ((10**7,), SamplingParams(), "vocabulary"),
    ((-1,), SamplingParams(), "vocabulary"),
    (tuple(range(600)), SamplingParams(), "context limit"),  # tiny model: 512 positions
]


@pytest.mark.parametrize(("ids", "params", "words"), BAD_REQUESTS)
def test_bad_input_is_a_clear_error_and_engine_keeps_serving(engine: Engine, ids, params, words) -> None:
    with pytest.raises(InvalidRequest, match=words):
        engine.submit(GenerationRequest(f"bad-{words}", ids, params))
    ok = generate(engine, [[1, 2, 3]], max_new_tokens=2, ignore_eos=True)[0]
    assert len(ok.token_ids) == 2


def test_unknown_adapter_is_invalid(engine: Engine) -> None:
    with pytest.raises(InvalidRequest, match="unknown adapter"):
        engine.submit(GenerationRequest("adapter-x", (1, 2), SamplingParams(), adapter="nope"))


def test_queue_full(tiny_llama_dir: Path) -> None:
    eng = Engine.create(ModelConfig(path=str(tiny_llama_dir), quantize=False), EngineConfig(max_waiting=3))
    for i in range(3):  # not started: everything waits
        eng.submit(GenerationRequest(f"q{i}", (1, 2), SamplingParams(max_new_tokens=2)))
    with pytest.raises(QueueFull, match="waiting queue is full"):
        eng.submit(GenerationRequest("q3", (1, 2), SamplingParams(max_new_tokens=2)))
    eng.start()
    eng.shutdown(drain_timeout_s=30)


def test_incremental_detokenizer_never_splits_characters(engine: Engine) -> None:
    tok = engine.tokenizer
    text = "Grüße, 東京! 🚀🎉 naïve café — ok"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.push(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)


def test_our_kernels_package_is_not_mistaken_for_pypi_kernels() -> None:
    """transformers and bitsandbytes probe for the PyPI `kernels` package; ours must not satisfy them."""
    import importlib.metadata

    from transformers.utils import import_utils

    import_utils.is_kernels_available.cache_clear()
    assert not import_utils.is_kernels_available()
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("kernels")
    import kernels

    assert not hasattr(kernels, "get_kernel")  # bnb's `from kernels import get_kernel` falls back cleanly
    repo = Path(__file__).resolve().parents[1]
    assert Path(next(iter(kernels.__path__))).resolve() == repo / "kernels"
    # proto/ holds only .proto sources: no importable module named proto with our code in it
    import importlib.util

    spec = importlib.util.find_spec("proto")
    assert spec is None or spec.origin is None or "switchboard" not in (spec.origin or "")
