"""The batched sampler: one token per sampled row of a step, with per-sequence parameters.

Semantics, for row i with params p (all as tensor ops over the [S, V] logits; no loop over the vocabulary):
    raw[i]       = logits[i]                                      (logprobs are log_softmax(raw[i]), as vLLM's
                                                                   default `raw_logprobs` mode reports them)
    seen[i, v]   = token v occurs in the prompt or the output      (repetition_penalty, as vLLM / CTRL)
    count[i, v]  = occurrences of v in the output                  (presence / frequency, OpenAI semantics)
    l            = raw[i]; l[seen] = l / rp if l > 0 else l * rp
    l           -= frequency_penalty * count + presence_penalty * (count > 0)
    l[t]        += logit_bias[t]
    l[eos]       = -inf while len(output) < min_tokens
    greedy (temperature < GREEDY_EPSILON): argmax(l)
    otherwise:   q = softmax(l / T) restricted to top_k, top_p (nucleus, keeps the first) and min_p * max(q);
                 a draw from the row's own generator, so a seeded request gives the same tokens whatever else
                 is in the batch.
A row whose logits are not finite (NaN, +inf, or no finite entry), or whose processed distribution has no
mass, is reported in `errors` and gets token -1; the other rows are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.request import SamplingParams
from server.engine.sequence import Sequence


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


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompts: list[tuple[int, ...]],
                    outputs: list[list[int]]) -> torch.Tensor:
    """Repetition / frequency / presence penalties and logit_bias on logits [S, V] (a new tensor)."""
    S, V = logits.shape
    device = logits.device
    out = logits.clone()
    rep = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device)  # [S]
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
    """probs [S, V]: softmax(logits / T) with top-k, top-p and min-p applied per row, renormalized."""
    S, V = logits.shape
    device = logits.device
    temp = torch.tensor([max(p.temperature, 1e-5) for p in params], dtype=torch.float32, device=device)
    scaled = logits / temp[:, None]
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)  # [S, V]
    k = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in params], device=device)
    rank = torch.arange(V, device=device)[None, :]
    drop = rank >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    drop |= (torch.cumsum(probs, dim=-1) - probs) >= top_p[:, None]  # keeps the first token always
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
    drop |= probs < (min_p * probs[:, 0])[:, None]
    drop[:, 0] = False
    probs = probs.masked_fill(drop, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, order, probs)


def _row_errors(logits: torch.Tensor) -> list[str | None]:
    nan = torch.isnan(logits).any(dim=-1)
    pos_inf = torch.isposinf(logits).any(dim=-1)
    none_finite = ~torch.isfinite(logits).any(dim=-1)
    errors: list[str | None] = [None] * logits.shape[0]
    if bool((nan | pos_inf | none_finite).any()):
        for i in torch.nonzero(nan | pos_inf | none_finite).flatten().tolist():
            what = "NaN" if nan[i] else "+inf" if pos_inf[i] else "no finite"
            errors[i] = f"the model produced {what} logits for this sequence (a broken adapter or overflow)"
    return errors


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...] = ()) -> SampleOutput:
    """One token per row of logits [S, V] (fp32), row i for seqs[i]; see the module docstring."""
    S, V = logits.shape
    logits = logits.float()
    params = [s.request.sampling for s in seqs]
    errors = _row_errors(logits)
    ok = [i for i in range(S) if errors[i] is None]
    tokens: list[int] = [-1] * S
    logprobs: list[float | None] = [None] * S
    top: list[list[tuple[int, float]] | None] = [None] * S
    if not ok:
        return SampleOutput(tokens, logprobs, top, errors)
    rows = torch.tensor(ok, dtype=torch.int64, device=logits.device)
    raw = logits.index_select(0, rows) if len(ok) < S else logits  # [R, V]
    ps = [params[i] for i in ok]
    processed = apply_penalties(raw, ps, [seqs[i].prompt_ids for i in ok], [seqs[i].output_ids for i in ok])
    eos = [e for e in eos_token_ids if 0 <= e < V]
    hold = [j for j, i in enumerate(ok) if len(seqs[i].output_ids) < ps[j].min_tokens]
    if eos and hold:
        hold_rows = torch.tensor(hold, dtype=torch.int64, device=logits.device)
        eos_cols = torch.tensor(eos, dtype=torch.int64, device=logits.device)
        processed[hold_rows[:, None], eos_cols[None, :]] = float("-inf")
    chosen = processed.argmax(dim=-1)  # [R] greedy rows keep this
    random_rows = [j for j, p in enumerate(ps) if not p.greedy]
    if random_rows:
        sub = torch.tensor(random_rows, dtype=torch.int64, device=logits.device)
        probs = filter_probs(processed.index_select(0, sub), [ps[j] for j in random_rows])  # [Rr, V]
        bad = ~torch.isfinite(probs).all(dim=-1)
        for n, j in enumerate(random_rows):
            if bad[n]:
                errors[ok[j]] = "no token has probability mass after the penalties and logit_bias"
                continue
            drawn = torch.multinomial(probs[n], 1, generator=seqs[ok[j]].generator)
            chosen[j] = drawn[0]
    if not torch.isfinite(processed.gather(1, chosen[:, None])).all():
        for j, i in enumerate(ok):
            if errors[i] is None and not torch.isfinite(processed[j, chosen[j]]):
                errors[i] = "no token has probability mass after the penalties and logit_bias"
    chosen_list = chosen.tolist()
    for j, i in enumerate(ok):
        if errors[i] is None:
            tokens[i] = int(chosen_list[j])
    want = [j for j, p in enumerate(ps) if p.wants_logprobs and errors[ok[j]] is None]
    if want:
        sub = torch.tensor(want, dtype=torch.int64, device=logits.device)
        lp = torch.log_softmax(raw.index_select(0, sub), dim=-1)  # [W, V] of the raw distribution
        picked = lp.gather(1, chosen.index_select(0, sub)[:, None]).squeeze(1).tolist()
        k = max(ps[j].top_logprobs for j in want)
        top_vals, top_ids = (lp.topk(k, dim=-1) if k else (None, None))
        for n, j in enumerate(want):
            logprobs[ok[j]] = float(picked[n])
            kj = ps[j].top_logprobs
            if kj:
                top[ok[j]] = list(zip(top_ids[n, :kj].tolist(), top_vals[n, :kj].tolist(), strict=True))
            else:
                top[ok[j]] = []
    return SampleOutput(tokens, logprobs, top, errors)
