"""The batched sampler: one token per sampled row of a step, with per-sequence parameters.

Semantics, for row i with params p (all as tensor ops over the [S, V] logits; no loop over the vocabulary):
    raw[i]       = logits[i]                                      (logprobs are log_softmax(raw[i]), as vLLM's
                                                                   default `raw_logprobs` mode reports them)
    seen[i, v]   = token v occurs in the prompt or the output      (repetition_penalty, as vLLM / CTRL)
    count[i, v]  = occurrences of v in the output                  (presence / frequency, OpenAI semantics)
    l            = raw[i]; l[seen] = l / rp if l > 0 else l * rp    (rp at least 1e-5, as temperature)
    l           -= frequency_penalty * count + presence_penalty * (count > 0)
    l[t]        += logit_bias[t]
    l[eos]       = -inf while len(output) < min_tokens
    l[t]         = -inf for every token t the row's output constraint forbids (server/structured/masks.py;
                   rows without one untouched, and no work at all when no row has one)
    greedy (temperature < GREEDY_EPSILON): argmax(l)
    otherwise:   p = softmax(l / T) over the top_k largest, entries below min_p * max(p) dropped, then the
                 nucleus (top_p: the smallest prefix of the sorted p whose mass reaches top_p; keeps the first);
                 token = argmax(p / e) with e ~ Exp(1) drawn from the row's own generator (an exact draw from
                 p / sum(p), as vLLM samples), so a seeded request gives the same tokens whatever else is in the
                 batch.
A row whose logits are not finite (NaN, +inf, or no finite entry), or whose processed distribution has no
mass, is reported in `errors` and gets token -1; the other rows are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.request import SamplingParams
from server.engine.sequence import Sequence
from server.structured.masks import apply_grammar_masks


@dataclass(slots=True)
class SampleOutput:
    tokens: list[int]  # [S]
    logprobs: list[float | None]  # [S] logprob of the sampled token (None if not requested)
    top_logprobs: list[list[tuple[int, float]] | None]  # [S] top-k (token, logprob) when requested
    errors: list[str | None]  # [S] why the row could not be sampled; None = ok


def _counts(rows: list[list[int]] | list[tuple[int, ...]], vocab: int, device: torch.device) -> torch.Tensor:
    """counts [S, V] (float32) of each row's token ids, by one scatter_add over a padded [S, L] index."""
    width = max((len(r) for r in rows), default=0)
    counts = torch.zeros(len(rows), vocab + 1, dtype=torch.float32, device=device)
    if width == 0:
        return counts[:, :vocab]
    index = torch.full((len(rows), width), vocab, dtype=torch.int64)  # padding counts into the extra column
    for i, r in enumerate(rows):
        if r:
            index[i, : len(r)] = torch.as_tensor(r, dtype=torch.int64).clamp_(0, vocab)
    index = index.to(device)
    counts.scatter_add_(1, index, torch.ones(index.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab]


def needs_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1 or p.frequency_penalty != 0 or p.presence_penalty != 0 or bool(p.logit_bias)


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompts: list[tuple[int, ...]],
                    outputs: list[list[int]]) -> torch.Tensor:
    """Repetition / frequency / presence penalties and logit_bias on logits [S, V] (a new tensor)."""
    S, V = logits.shape
    device = logits.device
    out = logits.clone()
    rep = torch.tensor([max(p.repetition_penalty, 1e-5) for p in params], dtype=torch.float32,
                       device=device)  # [S]; a tiny penalty (5e-324 is valid) would divide by fp32 0
    freq = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=device)  # [S]
    pres = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=device)  # [S]
    need_out = bool((rep != 1).any() or (freq != 0).any() or (pres != 0).any())
    if need_out:
        out_counts = _counts(outputs, V, device)  # [S, V]
        if bool((rep != 1).any()):
            rep_rows = [prompts[i] if p.repetition_penalty != 1 else () for i, p in enumerate(params)]
            seen = (_counts(rep_rows, V, device) + out_counts) > 0  # [S, V]
            r = rep[:, None].expand(S, V)
            out = torch.where(seen, torch.where(out > 0, out / r, out * r), out)
        out = out - freq[:, None] * out_counts - pres[:, None] * (out_counts > 0).float()
    biased = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias if 0 <= t < V]
    if biased:
        rows = torch.tensor([i for i, _, _ in biased], dtype=torch.int64, device=device)
        cols = torch.tensor([t for _, t, _ in biased], dtype=torch.int64, device=device)
        vals = torch.tensor([b for _, _, b in biased], dtype=torch.float32, device=device)
        out.index_put_((rows, cols), vals, accumulate=True)
    return out


def filter_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Unnormalized probs [R, V]: softmax(logits / T) with top-k, min-p and top-p applied per row (dropped = 0)."""
    R, V = logits.shape
    device = logits.device
    temp = torch.tensor([max(p.temperature, 1e-5) for p in params], dtype=torch.float32, device=device)
    scaled = logits / temp[:, None]
    ks = [p.top_k if 0 < p.top_k < V else 0 for p in params]
    if any(ks):
        values = torch.topk(scaled, max(ks), dim=-1).values  # [R, kmax], descending
        idx = torch.tensor([max(k, 1) - 1 for k in ks], device=device)
        kth = values.gather(1, idx[:, None])  # [R, 1]
        kth = torch.where(torch.tensor(ks, device=device)[:, None] > 0, kth, torch.full_like(kth, float("-inf")))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    min_p = [p.min_p for p in params]
    if any(min_p):
        floor = torch.tensor(min_p, dtype=torch.float32, device=device) * probs.max(dim=-1).values
        probs = probs.masked_fill(probs < floor[:, None], 0.0)
    nucleus = [j for j, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        rows = torch.tensor(nucleus, dtype=torch.int64, device=device)
        sub = probs.index_select(0, rows)
        sorted_p, order = torch.sort(sub, dim=-1, descending=True)
        top_p = torch.tensor([params[j].top_p for j in nucleus], dtype=torch.float32, device=device)
        mass = sorted_p.sum(dim=-1, keepdim=True)
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= top_p[:, None] * mass  # keeps the first token
        drop[:, 0] = False  # ... also when top_p underflows fp32 to 0 (5e-324 is a valid top_p)
        sub = sub.scatter(1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs.index_copy(0, rows, sub)
    return probs


def _row_errors(logits: torch.Tensor, row_max: torch.Tensor) -> list[str | None]:
    """A message per row whose logits are NaN anywhere, +inf anywhere, or nowhere finite: exactly the rows
    whose max (row_max [S]) is NaN, +inf or -inf."""
    errors: list[str | None] = [None] * logits.shape[0]
    bad = ~torch.isfinite(row_max)
    if bool(bad.any()):
        for i in torch.nonzero(bad).flatten().tolist():
            row = logits[i]
            what = "NaN" if torch.isnan(row).any() else "+inf" if torch.isposinf(row).any() else "no finite"
            errors[i] = f"the model produced {what} logits for this sequence (a broken adapter or overflow)"
    return errors


NO_MASS = "no token has probability mass after the penalties and logit_bias"


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...] = ()) -> SampleOutput:
    """One token per row of logits [S, V] (fp32), row i for seqs[i]; see the module docstring."""
    S, V = logits.shape
    logits = logits.float()
    device = logits.device
    params = [s.request.sampling for s in seqs]
    row_max, row_argmax = logits.max(dim=-1)  # [S], [S]: one pass gives the health check and the greedy tokens
    errors = _row_errors(logits, row_max)
    ok = [i for i in range(S) if errors[i] is None]
    tokens: list[int] = [-1] * S
    logprobs: list[float | None] = [None] * S
    top: list[list[tuple[int, float]] | None] = [None] * S
    if not ok:
        return SampleOutput(tokens, logprobs, top, errors)
    raw = logits if len(ok) == S else logits.index_select(0, torch.tensor(ok, device=device))  # [R, V]
    ps = [params[i] for i in ok]
    processed = raw
    if any(needs_penalties(p) for p in ps):
        processed = apply_penalties(raw, ps, [seqs[i].prompt_ids for i in ok], [seqs[i].output_ids for i in ok])
    eos = [e for e in eos_token_ids if 0 <= e < V]
    hold = [j for j, i in enumerate(ok) if len(seqs[i].output_ids) < ps[j].min_tokens]
    if eos and hold:
        processed = processed.clone() if processed is raw else processed
        hold_rows = torch.tensor(hold, dtype=torch.int64, device=device)
        eos_cols = torch.tensor(eos, dtype=torch.int64, device=device)
        processed[hold_rows[:, None], eos_cols[None, :]] = float("-inf")
    constrained = [j for j, i in enumerate(ok) if seqs[i].grammar is not None]
    if constrained:
        processed = processed.clone() if processed is raw else processed
        processed = apply_grammar_masks(processed, constrained, [seqs[ok[j]].grammar for j in constrained])
    if processed is raw:  # greedy rows keep these
        chosen = row_argmax if len(ok) == S else row_argmax.index_select(0, torch.tensor(ok, device=device))
        dead = torch.zeros(len(ok), dtype=torch.bool, device=device)
    else:
        best, chosen = processed.max(dim=-1)
        dead = ~torch.isfinite(best)  # every entry masked to -inf
    random_rows = [j for j, p in enumerate(ps) if not p.greedy]
    if random_rows:
        every = len(random_rows) == len(ok)
        sub = torch.tensor(random_rows, dtype=torch.int64, device=device)
        picked_logits = processed if every else processed.index_select(0, sub)
        probs = filter_probs(picked_logits, [ps[j] for j in random_rows])  # [Rr, V]
        # e = -log(u), u ~ U[0, 1) from the row's generator: Exp(1) (u = 0 gives inf: that token is never drawn)
        uniform = torch.empty(len(random_rows), V)
        for n, j in enumerate(random_rows):
            torch.rand(V, generator=seqs[ok[j]].generator, out=uniform[n])
        noise = uniform.to(device).log_().neg_().clamp_(min=1e-20)
        drawn = (probs / noise).argmax(dim=-1)
        mass = probs.sum(dim=-1)
        no_mass = ~(mass > 0) | ~torch.isfinite(mass)
        chosen = drawn if every else chosen.index_copy(0, sub, drawn)
        dead = no_mass if every else dead.index_copy(0, sub, no_mass)
    chosen_list, dead_list = chosen.tolist(), dead.tolist()
    for j, i in enumerate(ok):
        if dead_list[j]:
            grammar = seqs[i].grammar
            errors[i] = (grammar.error if grammar is not None else None) or NO_MASS
        else:
            tokens[i] = int(chosen_list[j])
    want = [j for j, p in enumerate(ps) if p.wants_logprobs and errors[ok[j]] is None]
    if want:
        sub = torch.tensor(want, dtype=torch.int64, device=device)
        lp = torch.log_softmax(raw.index_select(0, sub), dim=-1)  # [W, V] of the raw distribution
        picked = lp.gather(1, chosen.index_select(0, sub)[:, None]).squeeze(1).tolist()
        k = max(ps[j].top_logprobs for j in want)
        top_vals, top_ids = lp.topk(k, dim=-1) if k else (None, None)
        for n, j in enumerate(want):
            logprobs[ok[j]] = float(picked[n])
            kj = ps[j].top_logprobs
            top[ok[j]] = list(zip(top_ids[n, :kj].tolist(), top_vals[n, :kj].tolist(), strict=True)) if kj else []
    return SampleOutput(tokens, logprobs, top, errors)
