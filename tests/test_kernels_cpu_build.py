"""The CPU kernels' builds and memory: every ISA branch of kernels/csrc compiled and checked against the references
(AVX2 + FMA and plain x86-64 run here whatever the machine, AVX-512 at least compiled), huge-page slot tables, and
the aligned weight arena."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch

from kernels import cpu
from tests.compiler import needs_compiler
from tests.lora_cases import fresh_seed

pytestmark = needs_compiler


PORTABLE_CHECK = """
import torch
from kernels import attention, cpu
from kernels.meta import build_lora_meta
from kernels.reference import expand_reference, shrink_reference
from tests.lora_cases import make_case
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
    out = attention.paged_attention_kernel(q, k, v, meta, 0.125)
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
