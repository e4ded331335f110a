"""Random LoRA cases for the CPU kernel tests: slots by popularity (20% no adapter), strided / rank-major tables,
and a per-token fp64 loop oracle. The seed comes from SEED or fresh entropy; tests print it on failure."""

from __future__ import annotations

import os

import numpy as np
import torch

from bench.workloads import sample_adapter_ids

# (atol, rtol) on t and on y; bf16 y is rounded once, so one bf16 ulp of |y| is the scale of the error
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2)}
POPULARITY = ["distinct", "uniform", "zipf:1.5", "identical", "skewed"]
N_SLOTS = 8


def fresh_seed() -> int:
    return int(os.environ.get("SEED") or np.random.SeedSequence().entropy % 10**9)


def make_case(seed: int, n_tokens: int, max_rank: int, popularity: str, dtype: torch.dtype, grouped: bool,
              mixed_ranks: bool, n_in: int = 96, n_out: int = 80, strided: bool = True, rank_major: bool = False):
    """Slots (20% no adapter), x, A/B as strided views of [slots, layers, rank, ...] tables, scales, y0, ranks.
    rank_major: B [slots, out, rank] is a transposed view of a [slots, layers, rank, out] table (the pool's)."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    ids = sample_adapter_ids(popularity, n_tokens, N_SLOTS, rng)
    ids = np.where(rng.random(n_tokens) < 0.2, -1, ids)
    slots = torch.tensor(ids, dtype=torch.int32)
    if grouped:
        slots = torch.sort(slots, stable=True).values
    ranks = [int(r) for r in rng.integers(1, max_rank + 1, N_SLOTS)] if mixed_ranks else None
    layers, layer = (3, 1) if strided else (1, 0)
    a_all = torch.randn(N_SLOTS, layers, max_rank, n_in, generator=g).to(dtype)
    b_all = torch.randn(N_SLOTS, layers, n_out, max_rank, generator=g).to(dtype)
    if rank_major:
        b_all = b_all.transpose(2, 3).contiguous().transpose(2, 3)  # same values, out contiguous
    a, b = (a_all[:, layer], b_all[:, layer]) if strided else (a_all[:, 0].contiguous(), b_all[:, 0])
    x = torch.randn(n_tokens, n_in, generator=g).to(dtype)
    y0 = torch.randn(n_tokens, n_out, generator=g).to(dtype)
    scales = torch.rand(N_SLOTS, generator=g) + 0.5
    return slots, x, a, b, scales, y0, ranks


def loop_oracle(slots, x, a, b, scales, y0, ranks) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fp64 loop over each adapter's true rank: t [T, max_rank] and y [T, out]."""
    t = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float64)
    y = y0.double().clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            r = a.shape[1] if ranks is None else ranks[s]
            t[i, :r] = a[s, :r].double() @ x[i].double()
            y[i] += scales[s].double() * (b[s, :, :r].double() @ t[i, :r])
    return t, y
