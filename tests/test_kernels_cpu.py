"""The compiled CPU LoRA kernels (kernels/cpu.py) against kernels/reference.py and a per-token fp64 loop.

Fresh random inputs every run; the seed is in every assertion message (rerun a failure with SEED=<n>).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import kernels
from bench.workloads import sample_adapter_ids
from kernels import cpu
from kernels.meta import build_lora_meta
from kernels.reference import expand_reference, shrink_reference

# (atol, rtol) on t and on y; bf16 y is rounded once, so one bf16 ulp of |y| is the scale of the error
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2)}
POPULARITY = ["distinct", "uniform", "zipf:1.5", "identical", "skewed"]
N_SLOTS = 8

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the CPU kernel falls back")


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
    torch.testing.assert_close(t, t_ref, atol=atol, rtol=rtol, msg=lambda m: f"shrink: {m}\n{why}")

    y = y0.clone()
    assert cpu.cpu_expand(t_ref, b, scales, meta, y) is y, why
    y_ref = expand_reference(t_ref, b, scales, meta, y0.clone())
    assert y.dtype == dtype, why
    torch.testing.assert_close(y.float(), y_ref.float(), atol=atol * 10, rtol=rtol,
                               msg=lambda m: f"expand: {m}\n{why}")

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
    assert [t.shape[1] for t in kernels.lora_shrink_many(x, [a_q, a_k, a_v], meta)] == [16, 16, 16]


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
    assert torch.count_nonzero(kernels.lora_shrink(x, a, meta)) == 0
    assert torch.equal(kernels.lora_expand(torch.ones(3, 4), b, torch.ones(N_SLOTS), meta, y0.clone()), y0)
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
    torch.testing.assert_close(cpu.cpu_shrink(x, a, meta), shrink_reference(x, a, meta), msg=f"seed={seed}")
    slots, x, a, b, scales, y0, ranks = make_case(seed, 7, 8, "uniform", torch.float32, True, False)
    a_t = a.transpose(1, 2).contiguous().transpose(1, 2)  # same values, stride(-1) != 1
    assert a_t.stride(-1) != 1
    torch.testing.assert_close(cpu.cpu_shrink(x, a_t, meta), shrink_reference(x, a, meta), msg=f"seed={seed}")
    t = shrink_reference(x, a, meta)
    b_wide = torch.zeros(N_SLOTS, b.shape[1], 2 * b.shape[2], 2)
    b_wide[:, :, ::2, 0] = b  # same values, no unit stride on either inner axis
    b_s = b_wide[:, :, ::2, 0]
    assert 1 not in (b_s.stride(1), b_s.stride(2))
    torch.testing.assert_close(cpu.cpu_expand(t, b_s, scales, meta, y0.clone()),
                               expand_reference(t, b, scales, meta, y0.clone()), msg=f"seed={seed}")


@pytest.mark.parametrize("mode", ["cpu", "reference", "auto"])
def test_dispatcher_modes_agree(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "MODE", mode)
    seed = fresh_seed()
    slots, x, a, b, scales, y0, ranks = make_case(seed, 33, 16, "zipf:1.5", torch.float32, True, True)
    meta = build_lora_meta(slots, ranks)
    y = kernels.lora_expand(kernels.lora_shrink(x, a, meta), b, scales, meta, y0.clone())
    _, y64 = loop_oracle(slots, x, a, b, scales, y0, ranks)
    torch.testing.assert_close(y.double(), y64, atol=1e-3, rtol=1e-4, msg=lambda m: f"{m}\nseed={seed} mode={mode}")
    b_rank_major = b.transpose(1, 2).contiguous().transpose(1, 2)
    (y_fused,) = kernels.lora_apply(x, [a], [b_rank_major], scales, meta, [y0.clone()])
    torch.testing.assert_close(y_fused.double(), y64, atol=1e-3, rtol=1e-4,
                               msg=lambda m: f"lora_apply: {m}\nseed={seed} mode={mode}")


PORTABLE_CHECK = """
import torch
from kernels import attention, cpu
from kernels.meta import build_lora_meta
from kernels.reference import expand_reference, shrink_reference
from tests.test_kernels_cpu import make_case
from tests.test_paged_attention import make_case as attention_case
seed = {seed}
for dtype in (torch.float32, torch.bfloat16):
    for rank, n, grouped in ((16, 33, True), (64, 7, False), (5, 256, True)):
        slots, x, a, b, scales, y0, ranks = make_case(seed, n, rank, "skewed", dtype, grouped, rank != 16)
        meta = build_lora_meta(slots, ranks)
        t = cpu.cpu_shrink(x, a, meta)
        torch.testing.assert_close(t, shrink_reference(x, a, meta), atol=1e-4, rtol=1e-4)
        y = cpu.cpu_expand(t, b, scales, meta, y0.clone())
        y_ref = expand_reference(t, b, scales, meta, y0.clone())
        torch.testing.assert_close(y.float(), y_ref.float(), atol=0.3 if dtype == torch.bfloat16 else 1e-3, rtol=3e-2)
    q, k, v, meta, _ = attention_case(seed, [(1, 700), (5, 300), (1, 17)], 9, 3, 64, 16, dtype)
    out = attention.paged_attention(q, k, v, meta, 0.125)
    ref = attention.paged_attention_reference(q, k, v, meta, 0.125)
    torch.testing.assert_close(out.float(), ref.float(), atol=1.6e-2 if dtype == torch.bfloat16 else 2e-5, rtol=0)
assert cpu.available() and attention.available()
print("portable ok")
"""


# -march levels below AVX-512: x86-64-v3 = AVX2 + FMA (kernels/csrc/vec.h's 8-lane intrinsics), x86-64 = SSE2 only
# (its generic vector-extension path and the omp-simd loops)
PORTABLE_MARCHES = ["x86-64-v3", "x86-64"]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 -march levels")
@pytest.mark.parametrize("march", PORTABLE_MARCHES)
def test_portable_build_without_avx512_matches_reference(tmp_path, march: str) -> None:
    """The kernels built for an ISA without AVX-512 in a fresh cache, in a subprocess."""
    run_portable_check(PORTABLE_CHECK, tmp_path, march)
    assert len(list((tmp_path / "kernels").glob("*.so"))) == 2, "both libraries built into the fresh cache"


def run_portable_check(check: str, cache: Path, march: str) -> None:
    """`check` (formatted with a fresh seed) in a subprocess whose kernels build for `march` (-march=) into the
    fresh cache `cache`; it must exit 0 and print "portable ok"."""
    import subprocess
    import sys

    seed = fresh_seed()
    env = {**os.environ, "SWITCHBOARD_CPU_MARCH": march, "SWITCHBOARD_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-c", check.format(seed=seed)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    why = f"seed={seed} march={march}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0 and "portable ok" in proc.stdout, why


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
    ys = kernels.lora_apply(x, a_s, b_s, scales, meta, [y.clone() for y in y0s])
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
    assert all(torch.equal(g, y) for g, y in zip(kernels.lora_apply(x, a_s, b_s, scales, no_lora, y_same), y0s,
                                                 strict=True)), why


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_table_zeros_is_torch_zeros(dtype: torch.dtype) -> None:
    """The huge-page table allocation: same shape, dtype, device and (zero) values as torch.zeros, independent
    storage, for tables both above and below the 2 MiB huge-page size."""
    for shape in ((4, 3, 64, 1536), (2, 3, 5)):
        t = cpu.table_zeros(*shape, dtype=dtype, device="cpu")
        assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
        assert torch.equal(t, torch.zeros(shape, dtype=dtype))
        u = cpu.table_zeros(*shape, dtype=dtype, device="cpu")
        t.fill_(1)
        assert torch.count_nonzero(u) == 0 and t.data_ptr() != u.data_ptr()


def test_arena_copies_are_aligned_independent_equal_copies() -> None:
    """One arena: every copy equal to its source (shape, dtype, values), 64-byte aligned, sharing no memory with
    the source, laid out in order without overlap; mixed dtypes and sizes that are not multiples of the line."""
    g = torch.Generator().manual_seed(3)
    sources = [torch.randn(7, 5, generator=g), torch.randint(0, 255, (13,), generator=g).to(torch.uint8),
               torch.randn(3, 576, generator=g).bfloat16(), torch.randn(600, 577, generator=g)[:, 1:]]
    copies = cpu.arena_copies(sources)
    ends = []
    for s, c in zip(sources, copies, strict=True):
        assert c.shape == s.shape and c.dtype == s.dtype and c.is_contiguous() and torch.equal(c, s)
        assert c.data_ptr() % cpu.ARENA_ALIGN == 0 and c.data_ptr() != s.data_ptr()
        ends.append((c.data_ptr(), c.data_ptr() + c.numel() * c.element_size()))
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(ends))
    sources[0].fill_(0)
    assert torch.count_nonzero(copies[0]) == copies[0].numel()
    assert cpu.arena_copies([]) == []


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
            results[n] = kernels.lora_apply(x, a_s, b_s, scales, meta, [y.clone() for y in y0s])
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
    ys = kernels.lora_apply(x, a_s, b_s, scales, meta, [y.clone() for y in y0s])
    for a, b, y0, y in zip(a_s, b_s, y0s, ys, strict=True):
        assert y.dtype == torch.float32
        y_ref = expand_reference(shrink_reference(x, a, meta), b, scales, meta, y0.clone())
        torch.testing.assert_close(y, y_ref, atol=1e-3, rtol=1e-4, msg=lambda m: f"{m}\nseed={seed} T={n_tokens}")


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 -march levels")
def test_every_kernel_compiles_for_avx512_and_plain_x86_64(tmp_path) -> None:
    """Each ISA branch of kernels/csrc compiles, whatever this machine runs: x86-64-v4 (AVX-512, only compiled when
    the CPU lacks it) and x86-64 (SSE2). The tests above run the branch of the machine they are on."""
    import subprocess
    import sys

    from kernels.build import CSRC

    names = sorted(p.stem for p in CSRC.glob("*.cpp"))
    check = f"from kernels.build import _build\nfor n in {names!r}:\n    _build(n)\nprint('built')"
    for march in ("x86-64-v4", "x86-64"):
        env = {**os.environ, "SWITCHBOARD_CPU_MARCH": march, "SWITCHBOARD_CACHE": str(tmp_path / march)}
        proc = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=600,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert proc.returncode == 0 and "built" in proc.stdout, f"march={march}\n{proc.stderr[-3000:]}"
        assert len(list((tmp_path / march / "kernels").glob("*.so"))) == len(names), march
