"""The constrained sampler against llguidance as the reference, on fixed logits (issue 32).

Oracle: llguidance's own per-token answers (`compute_logit_bias`, one byte per token, and
`validate_tokens`), a different path from the batched bitmask the sampler uses.
"""

from __future__ import annotations

import random

import pytest
import torch

from server.engine.request import GenerationRequest, RequestHandle, SamplingParams
from server.engine.sampler import sample
from server.engine.sequence import Sequence
from server.structured.constraint import Constraint
from server.structured.masks import apply_grammar_masks, fill_bitmasks, unpack
from tests.structured_utils import SCHEMAS, compiler, tokenizer

CONSTRAINTS = [Constraint.json_schema(s) for s in SCHEMAS[:6]] + [
    Constraint.json_object(), Constraint.regex(r"[0-9]{3}-[a-z]+"), Constraint.choice(["alpha", "beta", "gamma"]),
    Constraint.grammar('start: "(" item ("," item)* ")"\nitem: /[a-z]/'),
]


def allowed_reference(state) -> torch.Tensor:
    """allowed [V'] bool, from llguidance's byte-per-token logit bias (0 = forbidden, 200 = allowed)."""
    bias = torch.frombuffer(bytearray(state.matcher.compute_logit_bias()), dtype=torch.uint8)
    return bias > 0


def advanced_state(c: Constraint, steps: int, rng: random.Random):
    """A fresh state advanced by `steps` random tokens the grammar allows (fewer if it completes)."""
    state = compiler().compile(c).new_state()
    for _ in range(steps):
        ok = torch.nonzero(allowed_reference(state)).flatten().tolist()
        ok = [t for t in ok if t != tokenizer().eos_token_id]
        if state.done or not ok:
            break
        assert state.accept(rng.choice(ok))
    return state


def make_seq(params: SamplingParams, state, seed: int) -> Sequence:
    req = GenerationRequest(f"r-{random.random()}", (1, 2, 3), params)
    return Sequence(request=req, handle=RequestHandle(req.request_id), detok=None,
                    generator=torch.Generator().manual_seed(seed), grammar=state)


def test_unpack_equals_a_bit_loop():
    bits = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int32)
    for vocab in (100, 128, 140):  # shorter than, equal to and longer than the mask
        got = unpack(bits, vocab)
        for r in range(3):
            want = [t < 128 and bool((int(bits[r, t // 32]) >> (t % 32)) & 1) for t in range(vocab)]
            assert got[r].tolist() == want


def test_apply_masks_rows_in_any_order_and_a_subset():
    rng = random.Random(7)
    states = [advanced_state(c, 2, rng) for c in CONSTRAINTS[6:9]]
    V = len(tokenizer())
    logits = torch.randn(4, V)
    for rows in ([2, 0, 1], [0, 1, 2], [3, 1, 0]):
        n = len(logits) if len(rows) == 3 and max(rows) == 2 else 4
        got = apply_grammar_masks(logits[:n].clone(), rows, states)
        for j, r in enumerate(rows):
            want = logits[r].masked_fill(~allowed_reference(states[j])[:V], float("-inf"))
            assert torch.equal(got[r], want), (rows, j)
        untouched = [r for r in range(n) if r not in rows]
        assert all(torch.equal(got[r], logits[r]) for r in untouched)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_masks_equal_the_per_token_reference(seed: int):
    rng = random.Random(seed)
    states = [advanced_state(c, rng.randrange(6), rng) for c in CONSTRAINTS]
    states = [s for s in states if not s.done]
    V = len(tokenizer())
    got = unpack(fill_bitmasks(states), V)
    for j, s in enumerate(states):
        want = allowed_reference(s)[:V]
        assert torch.equal(got[j], want), f"row {j} ({CONSTRAINTS[j].kind}) differs from llguidance's reference"
        assert want.any()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_constrained_sampler_never_picks_a_forbidden_token_and_equals_unconstrained_when_allowed(seed: int):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    V = len(tokenizer())
    states = [advanced_state(c, rng.randrange(4), rng) for c in CONSTRAINTS]
    states = [s for s in states if not s.done]
    logits = torch.randn(len(states), V) * 4
    for j, s in enumerate(states):  # half the rows: the model's favourite is an allowed token
        if j % 2 == 0:
            allowed = torch.nonzero(allowed_reference(s)[:V]).flatten()
            logits[j, allowed[rng.randrange(len(allowed))]] = 30.0
    for params in (SamplingParams(), SamplingParams(temperature=0.8), SamplingParams(temperature=1.5, seed=3)):
        seeds = [rng.randrange(2**31) for _ in states]
        free = sample(logits, [make_seq(params, None, sd) for sd in seeds]).tokens
        out = sample(logits, [make_seq(params, s, sd) for s, sd in zip(states, seeds, strict=True)])
        assert out.errors == [None] * len(states)
        for j, s in enumerate(states):
            t = out.tokens[j]
            assert s.matcher.validate_tokens([t]) == 1, f"row {j} picked token {t}, which the grammar forbids"
            if s.matcher.validate_tokens([free[j]]) == 1:
                assert t == free[j], f"row {j}: the unconstrained pick {free[j]} is allowed, yet {t} was picked"
        assert sum(s.matcher.validate_tokens([free[j]]) for j, s in enumerate(states)) >= len(states) // 2


def test_logprobs_stay_of_the_raw_distribution_and_free_rows_are_untouched():
    rng = random.Random(5)
    V = len(tokenizer())
    logits = torch.randn(4, V) * 3
    state = advanced_state(CONSTRAINTS[2], 0, rng)
    params = SamplingParams(logprobs=True, top_logprobs=2)
    seqs = [make_seq(params, None, 1), make_seq(params, state, 2), make_seq(params, None, 3),
            make_seq(SamplingParams(temperature=1.0), None, 4)]
    out = sample(logits, seqs)
    ref = sample(logits, [make_seq(params, None, 1), make_seq(params, None, 2), make_seq(params, None, 3),
                          make_seq(SamplingParams(temperature=1.0), None, 4)])
    assert [out.tokens[i] for i in (0, 2, 3)] == [ref.tokens[i] for i in (0, 2, 3)]
    raw = torch.log_softmax(logits[1], dim=-1)
    assert out.logprobs[1] == pytest.approx(float(raw[out.tokens[1]]), abs=1e-5)
    assert out.top_logprobs[1] == ref.top_logprobs[1]  # the raw top tokens, whatever the mask allowed


def test_no_mask_work_without_a_constrained_row(monkeypatch):
    import server.engine.sampler as sampler

    def boom(*args, **kwargs):
        raise AssertionError("the mask path ran for a batch without a constraint")

    monkeypatch.setattr(sampler, "apply_grammar_masks", boom)
    logits = torch.randn(3, 64)
    out = sample(logits, [make_seq(SamplingParams(temperature=t), None, 0) for t in (0.0, 0.7, 1.0)])
    assert out.errors == [None] * 3
