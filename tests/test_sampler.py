"""The batched sampler against a plain per-row, per-token reference on fixed and random logits."""

from __future__ import annotations

import math
import random

import pytest
import torch

from server.engine.request import GenerationRequest, RequestHandle, SamplingParams
from server.engine.sampler import apply_penalties, sample
from server.engine.sequence import Sequence

V = 50


def make_seq(params: SamplingParams, prompt=(1, 2, 3), output=(), seed: int | None = 0) -> Sequence:
    req = GenerationRequest(f"r{id(params)}-{random.random()}", tuple(prompt), params)
    seq = Sequence(request=req, handle=RequestHandle(req.request_id), detok=None)
    seq.output_ids = list(output)
    seq.generator = torch.Generator().manual_seed(seed if seed is not None else 0)
    return seq


def reference_penalties(logits: list[float], p: SamplingParams, prompt, output) -> list[float]:
    """Token by token, as vLLM's penalties and OpenAI's logit_bias are documented."""
    out = list(logits)
    for v in range(len(out)):
        count = output.count(v)
        if p.repetition_penalty != 1 and (v in prompt or v in output):
            out[v] = out[v] / p.repetition_penalty if out[v] > 0 else out[v] * p.repetition_penalty
        out[v] -= p.frequency_penalty * count
        if count > 0:
            out[v] -= p.presence_penalty
    for t, b in p.logit_bias:
        out[t] += b
    return out


def random_case(rng: random.Random) -> tuple[SamplingParams, tuple[int, ...], tuple[int, ...]]:
    params = SamplingParams(
        repetition_penalty=rng.choice([1.0, 1.3, 0.7, 2.0]),
        frequency_penalty=rng.choice([0.0, 0.5, -1.0, 2.0]),
        presence_penalty=rng.choice([0.0, 0.5, -0.5, 1.5]),
        logit_bias=tuple((rng.randrange(V), rng.uniform(-100, 100)) for _ in range(rng.randrange(4))),
    )
    prompt = tuple(rng.randrange(V) for _ in range(rng.randrange(1, 12)))
    output = tuple(rng.randrange(V) for _ in range(rng.randrange(0, 15)))
    return params, prompt, output


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_penalties_and_logit_bias_equal_the_reference(seed: int):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    S = 7
    logits = torch.randn(S, V) * 5
    cases = [random_case(rng) for _ in range(S)]
    got = apply_penalties(logits, [c[0] for c in cases], [c[1] for c in cases], [list(c[2]) for c in cases])
    for i, (p, prompt, output) in enumerate(cases):
        want = torch.tensor(reference_penalties(logits[i].tolist(), p, prompt, output))
        assert torch.allclose(got[i], want, atol=1e-4), f"seed={seed} row={i} params={p}"


def test_penalties_on_fixed_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                       logit_bias=((4, 10.0), (0, -1.0)))
    got = apply_penalties(logits, [p], [(1,)], [[3, 3, 2]])[0].tolist()
    # token 0: bias -1 -> 1.0; 1 in prompt: -1*2 = -2; 2 once in output: 0.5/2 - 0.5 - 0.25 = -0.5;
    # 3 twice: 3/2 - 1.0 - 0.25 = 0.25; 4: 0 + 10
    assert got == pytest.approx([1.0, -2.0, -0.5, 0.25, 10.0])


def test_greedy_logprobs_and_top_logprobs_are_of_the_raw_distribution():
    torch.manual_seed(0)
    logits = torch.randn(3, V)
    params = [SamplingParams(logprobs=True, top_logprobs=5), SamplingParams(),
              SamplingParams(logprobs=True, repetition_penalty=3.0)]
    seqs = [make_seq(p) for p in params]
    out = sample(logits, seqs)
    lsm = torch.log_softmax(logits, dim=-1)
    assert out.tokens[0] == int(logits[0].argmax())
    assert out.logprobs[0] == pytest.approx(float(lsm[0, out.tokens[0]]), abs=1e-6)
    vals, ids = lsm[0].topk(5)
    assert [t for t, _ in out.top_logprobs[0]] == ids.tolist()
    assert [lp for _, lp in out.top_logprobs[0]] == pytest.approx(vals.tolist(), abs=1e-6)
    assert out.logprobs[1] is None and out.top_logprobs[1] is None
    # penalised row: the token comes from the processed logits, its logprob from the raw ones
    processed = apply_penalties(logits[2:], [params[2]], [seqs[2].prompt_ids], [[]])
    assert out.tokens[2] == int(processed.argmax())
    assert out.logprobs[2] == pytest.approx(float(lsm[2, out.tokens[2]]), abs=1e-6)
    assert out.errors == [None, None, None]


@pytest.mark.parametrize("temperature", [0.0, 1e-40, 1e-6, 5e-6])
def test_tiny_temperatures_are_greedy(temperature: float):
    torch.manual_seed(1)
    logits = torch.randn(2, V) * 10
    out = sample(logits, [make_seq(SamplingParams(temperature=temperature, seed=3)) for _ in range(2)])
    assert out.tokens == logits.argmax(dim=-1).tolist()
    assert out.errors == [None, None]


def test_non_finite_rows_fail_alone():
    torch.manual_seed(2)
    logits = torch.randn(4, V)
    logits[1, 7] = float("nan")
    logits[2, :] = float("-inf")
    logits[3, 3] = float("inf")
    seqs = [make_seq(SamplingParams(temperature=0.8, seed=5)) for _ in range(4)]
    out = sample(logits, seqs)
    alone = sample(logits[:1].clone(), [make_seq(SamplingParams(temperature=0.8, seed=5))])
    assert out.errors[0] is None and out.tokens[0] == alone.tokens[0]
    assert "NaN" in out.errors[1] and "no finite" in out.errors[2] and "+inf" in out.errors[3]
    assert out.tokens[1:] == [-1, -1, -1]


def test_seeded_rows_are_independent_of_the_batch():
    torch.manual_seed(3)
    logits = torch.randn(6, V)
    mk = [lambda i=i: make_seq(SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=100 + i), seed=100 + i)
          for i in range(6)]
    together = sample(logits, [m() for m in mk]).tokens
    alone = [sample(logits[i:i + 1].clone(), [mk[i]()]).tokens[0] for i in range(6)]
    assert together == alone


def test_top_k_top_p_min_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4)]))
    draws = {name: set() for name in ("k2", "p07", "minp")}
    params = {"k2": SamplingParams(temperature=1.0, top_k=2), "p07": SamplingParams(temperature=1.0, top_p=0.7),
              "minp": SamplingParams(temperature=1.0, min_p=0.25)}
    for seed in range(200):
        for name, p in params.items():
            draws[name].add(sample(logits, [make_seq(p, seed=seed)]).tokens[0])
    assert draws["k2"] == {0, 1}
    assert draws["p07"] == {0, 1}  # 0.5 < 0.7, 0.5+0.3 >= 0.7: the third token is dropped
    assert draws["minp"] == {0, 1, 2}  # 0.05 < 0.25 * 0.5


def test_min_tokens_masks_eos_until_reached():
    logits = torch.zeros(2, V)
    logits[:, 9] = 50.0  # EOS is by far the most likely
    p = SamplingParams(min_tokens=3)
    early, late = make_seq(p, output=(1, 2)), make_seq(p, output=(1, 2, 3))
    out = sample(logits, [early, late], eos_token_ids=(9,))
    assert out.tokens[0] != 9 and out.tokens[1] == 9


def test_sampled_frequencies_match_the_filtered_distribution():
    """A seeded chi-square-free check: 4,000 draws land within 4 sigma of each token's probability."""
    seed = 11
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, -8.0]])
    p = SamplingParams(temperature=0.7, top_k=5)
    gen = torch.Generator().manual_seed(seed)
    counts = [0] * 6
    seq = make_seq(p)
    seq.generator = gen
    n = 4000
    for _ in range(n):
        counts[sample(logits, [seq]).tokens[0]] += 1
    probs = torch.softmax(logits[0, :5] / 0.7, dim=-1).tolist() + [0.0]
    for v in range(6):
        sigma = math.sqrt(n * probs[v] * (1 - probs[v])) + 1e-9
        assert abs(counts[v] - n * probs[v]) <= 4 * sigma + 1, f"seed={seed} token={v} counts={counts}"
