"""The compiled CPU LoRA kernels (kernels/cpu.py) against kernels/reference.py and a per-token fp64 loop.

Fresh random inputs every run; the seed is in every assertion message (rerun a failure with SEED=<n>).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import kernels
from kernels import cpu
from kernels.meta import build_lora_meta
from kernels.reference import expand_reference, shrink_reference
from tests.compiler import needs_compiler
from tests.lora_cases import N_SLOTS, POPULARITY, TOL, fresh_seed, loop_oracle, make_case

pytestmark = needs_compiler


def cpu_ops() -> kernels.KernelBackend:
    """The compiled kernels' backend (the torch reference for a call a kernel cannot take)."""
    return kernels.backend("cpu", "cpu")


@pytest.mark.parametrize("b_layout", ["rank_major", "row_major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "ungrouped"])
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("n_tokens", [1, 7, 33, 256])
@pytest.mark.parametrize("rank", [1, 4, 8, 16, 64])
def test_cpu_kernel_matches_reference(rank: int, n_tokens: int, popularity: str, grouped: bool,
                                      dtype: torch.dtype, b_layout: str) -> None:
    seed = fresh_seed()
    mixed = rank > 1 and seed % 2 == 0  # half the draws: every slot its own true rank <= the padded rank
    slots, x, a, b, scales, y0, ranks = make_case(seed, n_tokens, rank, popularity, dtype, grouped, mixed,
                                                  rank_major=b_layout == "rank_major")
    meta = build_lora_meta(slots, ranks)
    why = (f"seed={seed} rank={rank} T={n_tokens} {popularity} grouped={grouped} mixed_ranks={mixed} {dtype} "
           f"B {b_layout}")
    atol, rtol = TOL[dtype]

    t = cpu.cpu_shrink(x, a, meta)
    t_ref = shrink_reference(x, a, meta)
    assert t.dtype == torch.float32 and t.shape == t_ref.shape, why
    torch.testing.assert_close(t, t_ref, atol=atol, rtol=rtol, msg=lambda m, why=why: f"shrink: {m}\n{why}")

    y = y0.clone()
    assert cpu.cpu_expand(t_ref, b, scales, meta, y) is y, why
    y_ref = expand_reference(t_ref, b, scales, meta, y0.clone())
    assert y.dtype == dtype, why
    torch.testing.assert_close(y.float(), y_ref.float(), atol=atol * 10, rtol=rtol,
                               msg=lambda m, why=why: f"expand: {m}\n{why}")

    no_lora = slots < 0
    assert torch.count_nonzero(t[no_lora]) == 0, why
    assert torch.equal(y[no_lora], y0[no_lora]), f"slot -1 rows changed; {why}"
    if dtype == torch.float32:  # an oracle independent of the reference
        t64, y64 = loop_oracle(slots, x, a, b, scales, y0, ranks)
        torch.testing.assert_close(t.double(), t64, atol=1e-4, rtol=1e-4, msg=lambda m: f"shrink/loop: {m}\n{why}")
        y_full = cpu.cpu_expand(t, b, scales, meta, y0.clone())
        torch.testing.assert_close(y_full.double(), y64, atol=1e-3, rtol=1e-4, msg=lambda m: f"expand/loop: {m}\n{why}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_tokens", [1, 33, 256])
def test_shrink_many_equals_separate_shrinks(n_tokens: int, dtype: torch.dtype) -> None:
    """q/k/v in one call: three tables (strided and not) over the same x."""
    seed = fresh_seed()
    slots, x, a_q, _, _, _, ranks = make_case(seed, n_tokens, 16, "zipf:1.5", dtype, False, True)
    g = torch.Generator().manual_seed(seed + 1)
    a_k = torch.randn(N_SLOTS, 2, 16, x.shape[1], generator=g).to(dtype)[:, 1]
    a_v = torch.randn(N_SLOTS, 16, x.shape[1], generator=g).to(dtype)
    meta = build_lora_meta(slots, ranks)
    many = cpu.cpu_shrink_many(x, [a_q, a_k, a_v], meta)
    for got, a in zip(many, (a_q, a_k, a_v), strict=True):
        torch.testing.assert_close(got, shrink_reference(x, a, meta), atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"{m}\nseed={seed} T={n_tokens} {dtype}")
    assert [t.shape[1] for t in cpu_ops().lora_shrink_many(x, [a_q, a_k, a_v], meta)] == [16, 16, 16]


@pytest.mark.parametrize("rank_major", [True, False], ids=["b_rank_major", "b_row_major"])
def test_thread_counts_agree(rank_major: bool) -> None:
    """The work split depends on the thread count; the result does not (each t/y element has one writer)."""
    seed = fresh_seed()
    slots, x, a, b, scales, y0, ranks = make_case(seed, 33, 16, "skewed", torch.float32, True, True,
                                                  rank_major=rank_major)
    meta = build_lora_meta(slots, ranks)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 5):
            torch.set_num_threads(n)
            t = cpu.cpu_shrink(x, a, meta)
            results.append((t, cpu.cpu_expand(t, b, scales, meta, y0.clone())))
    finally:
        torch.set_num_threads(before)
    for t, y in results[1:]:
        assert torch.equal(t, results[0][0]) and torch.equal(y, results[0][1]), f"seed={seed}"


def test_no_lora_batch_and_contiguous_tables() -> None:
    seed = fresh_seed()
    meta = build_lora_meta(torch.tensor([-1, -1, -1], dtype=torch.int32))
    x, y0 = torch.randn(3, 96), torch.randn(3, 80)
    a, b = torch.randn(N_SLOTS, 4, 96), torch.randn(N_SLOTS, 80, 4)
    assert torch.count_nonzero(cpu_ops().lora_shrink(x, a, meta)) == 0
    assert torch.equal(cpu_ops().lora_expand(torch.ones(3, 4), b, torch.ones(N_SLOTS), meta, y0.clone()), y0)
    slots, x, a, b, scales, y0, ranks = make_case(seed, 33, 8, "uniform", torch.float32, False, False, strided=False)
    meta = build_lora_meta(slots, ranks)
    y = cpu.cpu_expand(cpu.cpu_shrink(x, a, meta), b, scales, meta, y0.clone())
    y_ref = expand_reference(shrink_reference(x, a, meta), b, scales, meta, y0.clone())
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{m}\nseed={seed}")


def test_uncompiled_dtype_falls_back_to_reference() -> None:
    """fp16 (not compiled) and a table strided in its innermost dimension take the reference, same values."""
    seed = fresh_seed()
    slots, x, a, b, scales, y0, ranks = make_case(seed, 7, 8, "uniform", torch.float16, True, False)
    meta = build_lora_meta(slots, ranks)
    torch.testing.assert_close(cpu_ops().lora_shrink(x, a, meta), shrink_reference(x, a, meta), msg=f"seed={seed}")
    slots, x, a, b, scales, y0, ranks = make_case(seed, 7, 8, "uniform", torch.float32, True, False)
    a_t = a.transpose(1, 2).contiguous().transpose(1, 2)  # same values, stride(-1) != 1
    assert a_t.stride(-1) != 1
    torch.testing.assert_close(cpu_ops().lora_shrink(x, a_t, meta), shrink_reference(x, a, meta), msg=f"seed={seed}")
    t = shrink_reference(x, a, meta)
    b_wide = torch.zeros(N_SLOTS, b.shape[1], 2 * b.shape[2], 2)
    b_wide[:, :, ::2, 0] = b  # same values, no unit stride on either inner axis
    b_s = b_wide[:, :, ::2, 0]
    assert 1 not in (b_s.stride(1), b_s.stride(2))
    torch.testing.assert_close(cpu_ops().lora_expand(t, b_s, scales, meta, y0.clone()),
                               expand_reference(t, b, scales, meta, y0.clone()), msg=f"seed={seed}")


@pytest.mark.parametrize("mode", ["cpu", "reference", "auto"])
def test_dispatcher_modes_agree(mode: str) -> None:
    ops = kernels.backend("cpu", mode)
    seed = fresh_seed()
    slots, x, a, b, scales, y0, ranks = make_case(seed, 33, 16, "zipf:1.5", torch.float32, True, True)
    meta = build_lora_meta(slots, ranks)
    y = ops.lora_expand(ops.lora_shrink(x, a, meta), b, scales, meta, y0.clone())
    _, y64 = loop_oracle(slots, x, a, b, scales, y0, ranks)
    torch.testing.assert_close(y.double(), y64, atol=1e-3, rtol=1e-4, msg=lambda m: f"{m}\nseed={seed} mode={mode}")
    b_rank_major = b.transpose(1, 2).contiguous().transpose(1, 2)
    (y_fused,) = ops.lora_apply(x, [a], [b_rank_major], scales, meta, [y0.clone()])
    torch.testing.assert_close(y_fused.double(), y64, atol=1e-3, rtol=1e-4,
                               msg=lambda m: f"lora_apply: {m}\nseed={seed} mode={mode}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("n_tokens", [1, 7, 33, 256])
def test_fused_apply_matches_shrink_then_expand(n_tokens: int, popularity: str, dtype: torch.dtype) -> None:
    """kernels.lora_apply (one call for a q/k/v-like group: rank-major and row-major B, different outs and padded
    ranks) against the reference shrink then expand, and against the per-token fp64 loop."""
    seed = fresh_seed()
    grouped = seed % 2 == 0
    cases = [make_case(seed + i, n_tokens, r, popularity, dtype, grouped, True, n_out=o, rank_major=rm)
             for i, (r, o, rm) in enumerate([(16, 80, True), (4, 24, False), (64, 40, True)])]
    slots, x, _, _, scales, _, ranks = cases[0]
    ranks = [min(r, 4) for r in ranks]  # every stack's padded rank holds each slot's true rank
    meta = build_lora_meta(slots, ranks)
    a_s, b_s, y0s = [c[2] for c in cases], [c[3] for c in cases], [c[5] for c in cases]
    ys = cpu_ops().lora_apply(x, a_s, b_s, scales, meta, [y.clone() for y in y0s])
    why = f"seed={seed} T={n_tokens} {popularity} grouped={grouped} {dtype}"
    atol, rtol = TOL[dtype]
    for a, b, y0, y in zip(a_s, b_s, y0s, ys, strict=True):
        y_ref = expand_reference(shrink_reference(x, a, meta), b, scales, meta, y0.clone())
        torch.testing.assert_close(y.float(), y_ref.float(), atol=atol * 10, rtol=rtol, msg=lambda m: f"{m}\n{why}")
        assert torch.equal(y[slots < 0], y0[slots < 0]), f"slot -1 rows changed; {why}"
        if dtype == torch.float32:
            _, y64 = loop_oracle(slots, x, a, b, scales, y0, ranks)
            torch.testing.assert_close(y.double(), y64, atol=1e-3, rtol=1e-4, msg=lambda m: f"loop: {m}\n{why}")
    no_lora = build_lora_meta(torch.full((n_tokens,), -1, dtype=torch.int32))
    y_same = [y.clone() for y in y0s]
    assert all(torch.equal(g, y) for g, y in zip(cpu_ops().lora_apply(x, a_s, b_s, scales, no_lora, y_same), y0s,
                                                 strict=True)), why


@pytest.mark.parametrize("n_tokens, popularity", [(7, "identical"), (33, "distinct"), (256, "zipf:1.5")])
def test_lora_apply_thread_counts_and_schedules_agree(n_tokens: int, popularity: str) -> None:
    """lora_apply picks the fused (segment, token-block) schedule when there are enough blocks for the threads and
    shrink-all-then-expand otherwise (7 identical tokens on 2-3 threads); every thread count and schedule matches
    the reference and the one-thread result."""
    seed = fresh_seed()
    cases = [make_case(seed + i, n_tokens, r, popularity, torch.float32, True, True, n_in=256, n_out=o,
                       rank_major=rm) for i, (r, o, rm) in enumerate([(16, 192, True), (16, 64, True), (8, 96, False)])]
    slots, x, _, _, scales, _, ranks = cases[0]
    ranks = [min(r, 8) for r in ranks]
    meta = build_lora_meta(slots, ranks)
    a_s, b_s, y0s = [c[2] for c in cases], [c[3] for c in cases], [c[5] for c in cases]
    refs = [expand_reference(shrink_reference(x, a, meta), b, scales, meta, y0.clone())
            for a, b, y0 in zip(a_s, b_s, y0s, strict=True)]
    before = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results[n] = cpu_ops().lora_apply(x, a_s, b_s, scales, meta, [y.clone() for y in y0s])
    finally:
        torch.set_num_threads(before)
    for n, ys in results.items():
        for y, y_ref, y1 in zip(ys, refs, results[1], strict=True):
            why = f"seed={seed} T={n_tokens} {popularity} threads={n}"
            torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4, msg=lambda m, w=why: f"{m}\n{w}")
            torch.testing.assert_close(y, y1, atol=1e-5, rtol=1e-5, msg=lambda m, w=why: f"vs 1 thread: {m}\n{w}")


@pytest.mark.parametrize("n_tokens", [1, 7, 33, 256])
def test_lora_apply_fp32_activations_on_bf16_tables(n_tokens: int) -> None:
    """lora_dtype=bfloat16 on an fp32 model: x and y fp32, A and B bf16 (both B layouts), against the reference."""
    seed = fresh_seed()
    cases = [make_case(seed + i, n_tokens, r, "zipf:1.5", torch.float32, True, True, n_out=o, rank_major=rm)
             for i, (r, o, rm) in enumerate([(16, 80, True), (8, 48, False)])]
    slots, x, _, _, scales, _, ranks = cases[0]
    ranks = [min(r, 8) for r in ranks]
    meta = build_lora_meta(slots, ranks)
    a_s = [c[2].to(torch.bfloat16) for c in cases]
    b_s = [c[3].transpose(1, 2).contiguous().transpose(1, 2).to(torch.bfloat16) if rm else c[3].to(torch.bfloat16)
           for c, rm in zip(cases, (True, False), strict=True)]
    y0s = [c[5] for c in cases]
    ys = cpu_ops().lora_apply(x, a_s, b_s, scales, meta, [y.clone() for y in y0s])
    for a, b, y0, y in zip(a_s, b_s, y0s, ys, strict=True):
        assert y.dtype == torch.float32
        y_ref = expand_reference(shrink_reference(x, a, meta), b, scales, meta, y0.clone())
        torch.testing.assert_close(y, y_ref, atol=1e-3, rtol=1e-4, msg=lambda m: f"{m}\nseed={seed} T={n_tokens}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_in, n_out", [(13, 7), (100, 77), (576, 1539)])
@pytest.mark.parametrize("n_tokens", [1, 2, 7])
def test_sizes_off_the_vector_width(n_tokens: int, n_in: int, n_out: int, dtype: torch.dtype) -> None:
    """In / out sizes that are no multiple of 8 or 16 lanes (the vector loops' tails: the shrink's register tiles,
    the decode expand's sequential rows, the row-major dots), one token per adapter and several, both B layouts:
    shrink, expand and the fused apply against the reference, and fp32 against the fp64 loop."""
    seed = fresh_seed()
    atol, rtol = TOL[dtype]
    for popularity, rank_major in itertools.product(("distinct", "identical"), (True, False)):
        case = make_case(seed, n_tokens, 16, popularity, dtype, True, seed % 2 == 0, n_in=n_in, n_out=n_out,
                         rank_major=rank_major)
        slots, x, a, b, scales, y0, ranks = case
        meta = build_lora_meta(slots, ranks)
        why = f"seed={seed} T={n_tokens} in={n_in} out={n_out} {popularity} rank_major={rank_major} {dtype}"
        t_ref = shrink_reference(x, a, meta)
        torch.testing.assert_close(cpu.cpu_shrink(x, a, meta), t_ref, atol=atol, rtol=rtol,
                                   msg=lambda m, why=why: f"shrink: {m}\n{why}")
        y_ref = expand_reference(t_ref, b, scales, meta, y0.clone())
        y = cpu.cpu_expand(t_ref, b, scales, meta, y0.clone())
        torch.testing.assert_close(y.float(), y_ref.float(), atol=atol * 10, rtol=rtol,
                                   msg=lambda m, why=why: f"expand: {m}\n{why}")
        (y_apply,) = cpu_ops().lora_apply(x, [a], [b], scales, meta, [y0.clone()])
        torch.testing.assert_close(y_apply.float(), y_ref.float(), atol=atol * 10, rtol=rtol,
                                   msg=lambda m, why=why: f"apply: {m}\n{why}")
        if dtype == torch.float32:
            _, y64 = loop_oracle(*case)
            torch.testing.assert_close(y_apply.double(), y64, atol=1e-3, rtol=1e-4,
                                       msg=lambda m, why=why: f"apply/loop: {m}\n{why}")
