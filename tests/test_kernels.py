"""LoRA kernels: metadata tables, the reference against a per-token loop, Triton against the reference.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set before kernels.sgmv is imported);
with CUDA the same tests run the compiled kernels. Fresh random inputs each run.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
assert CUDA or os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets TRITON_INTERPRET on CPU"

from bench.workloads import sample_adapter_ids  # noqa: E402
from kernels.meta import build_lora_meta  # noqa: E402
from kernels.reference import expand_reference, shrink_reference  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}


def test_meta_exact_tables() -> None:
    m = build_lora_meta(torch.tensor([2, -1, 2, 0, -1, 2]))
    assert m.sorted_tokens.tolist() == [1, 4, 3, 0, 2, 5]
    assert m.seg_slots.tolist() == [-1, 0, 2]
    assert m.seg_starts.tolist() == [0, 2, 3, 6]
    assert m.has_lora
    none = build_lora_meta(torch.tensor([-1, -1]))
    assert not none.has_lora and none.seg_slots.tolist() == [-1]
    one = build_lora_meta(torch.tensor([5]))
    assert one.seg_starts.tolist() == [0, 1] and one.seg_slots.tolist() == [5]
    assert not m.contiguous and m.seg_ranks_list is None
    grouped = build_lora_meta(torch.tensor([-1, 0, 0, 3, 3, 3]), slot_ranks=[4, 0, 0, 16])
    assert grouped.contiguous and grouped.seg_ranks_list == [0, 4, 16]
    assert grouped.lora_segments() == [(1, 3, 0, 4), (3, 6, 3, 16)]


@pytest.mark.parametrize("popularity", ["distinct", "uniform", "zipf:1.5", "identical", "skewed"])
@pytest.mark.parametrize("n_tokens", [1, 9, 40])
@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("ranks", [[1, 4, 16, 8, 2, 16], [8] * 6], ids=["mixed-ranks", "one-rank"])
def test_reference_true_ranks_match_padded_loop(popularity: str, n_tokens: int, grouped: bool,
                                                ranks: list[int]) -> None:
    """Adapters of ranks 1..16 zero-padded to 16 in the tables: multiplying only the true rank (and, for a
    batch grouped by slot, through slices and row views) equals the per-token loop over the padded tables."""
    seed = int(torch.randint(0, 10**6, ()))
    slots, x, a, b, scales, y0 = random_case(n_tokens, 16, popularity, torch.float32, seed)
    for s, r in enumerate(ranks):  # what AdapterTables holds for a rank-r adapter: zeros past r
        a[s, r:] = 0
        b[s, :, r:] = 0
    if grouped:  # the engine's runner lays tokens out grouped by slot
        order = torch.sort(slots, stable=True).indices
        slots, x, y0 = slots[order], x[order], y0[order]
    meta = build_lora_meta(slots, slot_ranks=ranks)
    assert meta.contiguous == grouped or meta.contiguous  # ungrouped draws may happen to be sorted
    t = shrink_reference(x, a, meta)
    y = expand_reference(t, b, scales, meta, y0.clone())
    torch.testing.assert_close(y, loop_oracle(slots, x, a, b, scales, y0), atol=1e-4, rtol=1e-4)
    no_lora = slots < 0
    assert torch.count_nonzero(t[no_lora]) == 0 and torch.equal(y[no_lora], y0[no_lora])


def random_case(n_tokens: int, rank: int, popularity: str, dtype: torch.dtype, seed: int, n_in=40, n_out=48):
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    slots_n, layers = 6, 2
    ids = sample_adapter_ids(popularity, n_tokens, slots_n, rng)
    ids = np.where(rng.random(n_tokens) < 0.2, -1, ids)  # some tokens use no adapter
    x = torch.randn(n_tokens, n_in, generator=g).to(dtype)
    a_all = torch.randn(slots_n, layers, rank, n_in, generator=g).to(dtype)  # stacked like the pool's tables
    b_all = torch.randn(slots_n, layers, n_out, rank, generator=g).to(dtype)
    scales = torch.rand(slots_n, generator=g) + 0.5
    y0 = torch.randn(n_tokens, n_out, generator=g).to(dtype)
    return torch.tensor(ids, dtype=torch.int32), x, a_all[:, 1], b_all[:, 1], scales, y0


def loop_oracle(slots, x, a, b, scales, y0) -> torch.Tensor:
    y = y0.float().clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            y[i] += scales[s] * (x[i].float() @ a[s].float().t()) @ b[s].float().t()
    return y


@pytest.mark.parametrize("popularity", ["distinct", "uniform", "zipf:1.5", "identical", "skewed"])
@pytest.mark.parametrize("n_tokens", [1, 7, 33])
def test_reference_matches_per_token_loop(popularity: str, n_tokens: int) -> None:
    slots, x, a, b, scales, y0 = random_case(n_tokens, 8, popularity, torch.float32, int(torch.randint(0, 10**6, ())))
    meta = build_lora_meta(slots)
    y = expand_reference(shrink_reference(x, a, meta), b, scales, meta, y0.clone())
    torch.testing.assert_close(y, loop_oracle(slots, x, a, b, scales, y0), atol=1e-4, rtol=1e-4)


CASES = [
    (rank, n, pop, dtype)
    for rank, n, pop in [(1, 7, "distinct"), (4, 33, "uniform"), (8, 1, "identical"), (16, 100, "zipf:1.5"),
                         (64, 33, "distinct"), (16, 7, "identical"), (8, 100, "uniform"),
                         (16, 33, "skewed")]
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
]


@pytest.mark.parametrize(("rank", "n_tokens", "popularity", "dtype"), CASES)
def test_triton_matches_reference(rank: int, n_tokens: int, popularity: str, dtype: torch.dtype) -> None:
    from kernels.sgmv import sgmv_expand, sgmv_shrink

    slots, x, a, b, scales, y0 = random_case(n_tokens, rank, popularity, dtype, int(torch.randint(0, 10**6, ())))
    meta = build_lora_meta(slots.to(DEVICE))
    x, a, b, scales, y0 = (t.to(DEVICE) for t in (x, a, b, scales, y0))
    t_ref = shrink_reference(x, a, meta)
    t = sgmv_shrink(x, a, meta)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(t, t_ref, atol=atol, rtol=rtol)
    y_ref = expand_reference(t_ref, b, scales, meta, y0.clone())
    y = sgmv_expand(t_ref, b, scales, meta, y0.clone())
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref.float(), atol=atol * 10, rtol=rtol)


def test_triton_no_lora_tokens_leave_output_untouched() -> None:
    from kernels.sgmv import sgmv_expand, sgmv_shrink

    meta = build_lora_meta(torch.tensor([-1, -1, -1], device=DEVICE))
    x = torch.randn(3, 16, device=DEVICE)
    a, b = torch.randn(2, 4, 16, device=DEVICE), torch.randn(2, 8, 4, device=DEVICE)
    y0 = torch.randn(3, 8, device=DEVICE)
    assert torch.count_nonzero(sgmv_shrink(x, a, meta)) == 0
    ones_t, ones_scale = torch.ones(3, 4, device=DEVICE), torch.ones(2, device=DEVICE)
    assert torch.equal(sgmv_expand(ones_t, b, ones_scale, meta, y0.clone()), y0)
