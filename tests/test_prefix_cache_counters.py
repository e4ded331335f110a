"""The per-tenant prefix-cache counters across preemption: a re-admission recomputes the prompt and the tokens
generated so far but for its cached blocks, and the counters say so (computed + cached = what each admission
saw). Oracles: the cache switched off (every admission computes everything) and the model runner's own count
of the context entries it computed; the bill (cached prompt tokens of the response) still counts the prompt
once, at its first admission."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.engine.request import GenerationRequest
from tests.oracle_parity import draw_seed
from tests.prefix_cache_utils import BLOCK, count_computed, finish, greedy, make_engine


def _run(model_dir: Path, on: bool, prompt: list[int], preempt_after: list[int], new_tokens: int):
    """One request driven step by step, preempted once after each count of sampled tokens in `preempt_after`."""
    engine = make_engine(model_dir, prefix_cache=on, start=False, max_batch_tokens=256)
    try:
        count_computed(engine)
        handle = engine.submit(GenerationRequest("r", tuple(prompt), greedy(new_tokens)))
        engine.take_submitted()
        seq = engine._by_id["r"]
        todo = list(preempt_after)
        for _ in range(200):
            if handle.done or not engine.scheduler.has_work():
                break
            engine.step()
            if todo and len(seq.output_ids) == todo[0] and seq in engine.scheduler.running:
                todo.pop(0)
                engine.scheduler.preempt(seq)
        assert not todo, "the request finished before every preemption"
        done = finish(handle, timeout=5)
        return done, engine.stats().prefix.tokens.get("local", (0, 0)), engine.computed_tokens, \
            engine.scheduler.preemptions
    finally:
        engine.shutdown()


@pytest.mark.parametrize("preempt_after", [[5], [3, 7]], ids=["once", "twice"])
def test_recomputation_after_preemption_counts_as_computed(tiny_llama_dir: Path, preempt_after: list[int]) -> None:
    seed = draw_seed()
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 49152, (4 * BLOCK + 2,), generator=g).tolist()  # 18 tokens: 4 full blocks + 2
    on = _run(tiny_llama_dir, True, prompt, preempt_after, 12)
    off = _run(tiny_llama_dir, False, prompt, preempt_after, 12)
    assert on[0].tokens == off[0].tokens and len(on[0].tokens) == 12, seed
    assert on[3] == off[3] == len(preempt_after), seed
    # what admissions saw: the prompt, then at each re-admission the prompt and the k tokens generated so far
    seen = len(prompt) + sum(len(prompt) + k for k in preempt_after)
    assert off[1] == (seen, 0), seed
    computed, cached = on[1]
    assert computed + cached == seen, seed
    # each re-admission finds the full blocks of what was computed before it (all but its last entry)
    assert cached == sum((len(prompt) + k - 1) // BLOCK * BLOCK for k in preempt_after), seed
    assert off[2] - on[2] == cached, seed  # the runner computed exactly the cached entries fewer
    assert on[0].cached == off[0].cached == 0 and on[0].prompt_tokens == len(prompt), seed  # the bill: once
