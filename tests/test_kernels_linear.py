"""The CPU linear kernels (kernels/linear.py): fused NF4 against its torch reference and an fp64 oracle, dense fp32
against F.linear and fp64, on fresh random inputs every run; the seed is in every assertion message (rerun a
failure with SEED=<n>)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import kernels
from kernels import linear
from kernels.reference import nf4_linear_reference
from tests.compiler import needs_compiler
from tests.test_kernels_cpu_build import PORTABLE_MARCHES, run_portable_check

pytestmark = needs_compiler


def fresh_seed() -> int:
    return int(os.environ.get("SEED") or np.random.SeedSequence().entropy % 10**9)


def make_case(seed: int, m: int, n: int, k: int, blocksize: int = 64):
    """x [m, k], random 4-bit codes for W [n, k] (packed as bitsandbytes does), absmax, a random code table."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    packed = torch.randint(0, 256, (n * k // 2,), generator=g, dtype=torch.int32).to(torch.uint8)
    absmax = torch.rand(n * k // blocksize, generator=g) + 0.05
    code = torch.sort(torch.randn(16, generator=g)).values
    return x, packed, absmax, code


def fp64_oracle(x, packed, absmax, code, blocksize: int, n: int) -> torch.Tensor:
    hi, lo = (packed >> 4).long(), (packed & 15).long()
    q = torch.stack((hi, lo), dim=1).reshape(-1)
    w = (code.double()[q].reshape(-1, blocksize) * absmax.double().reshape(-1, 1)).reshape(n, -1)
    return x.double() @ w.t()


def assert_near_fp64(y: torch.Tensor, ref: torch.Tensor, y64: torch.Tensor, why: str) -> None:
    """Ours is off the fp64 result by at most 4x what the fp32 reference itself is (+1e-5)."""
    err, ref_err = (y.double() - y64).abs().max().item(), (ref.double() - y64).abs().max().item()
    assert err <= 4 * ref_err + 1e-5, f"ours {err} vs the fp32 reference's own {ref_err} off fp64; {why}"


@pytest.mark.parametrize("m", [1, 3, 4, 7, 33, 256])
@pytest.mark.parametrize("n, k", [(16, 64), (49, 576), (576, 576), (1000, 1536), (3, 128)])
def test_fused_nf4_matches_reference(m: int, n: int, k: int) -> None:
    seed = fresh_seed()
    x, packed, absmax, code = make_case(seed, m, n, k)
    y = linear.nf4_linear(x, packed, absmax, code, 64, n)
    why = f"seed={seed} M={m} N={n} K={k}"
    assert y is not None and y.shape == (m, n), why
    ref = nf4_linear_reference(x, packed, absmax, code, 64, n)
    torch.testing.assert_close(y, ref, atol=2e-4 * k ** 0.5, rtol=1e-4, msg=lambda s: f"{s}\n{why}")
    assert_near_fp64(y, ref, fp64_oracle(x, packed, absmax, code, 64, n), why)


def test_bitsandbytes_layout_and_layer() -> None:
    """On weights bitsandbytes quantized: the kernel equals bnb's dequantize + matmul, and NF4Linear uses it
    (with its bias) for calls of up to FUSED_MAX_TOKENS rows unless SWITCHBOARD_KERNELS=reference."""
    from server.model.quant import NF4Linear

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    layer = NF4Linear(torch.randn(200, 576, generator=g), torch.randn(200, generator=g), torch.float32, False)
    x = torch.randn(2, 5, 576, generator=g)
    dense = torch.nn.functional.linear(x, layer.dense_weight(), layer.bias)
    torch.testing.assert_close(layer(x), dense, atol=1e-4, rtol=1e-4, msg=lambda s: f"{s}\nseed={seed}")
    long = torch.randn(linear.FUSED_MAX_TOKENS + 1, 576, generator=g)  # a prefill-sized call: bitsandbytes' path
    assert torch.equal(layer(long), torch.nn.functional.linear(long, layer.dense_weight(), layer.bias)), seed
    layer.kernels = kernels.backend("cpu", "torch")
    assert torch.equal(layer(x), dense), f"reference mode is bitsandbytes' path; seed={seed}"


def test_uncovered_calls_fall_back() -> None:
    seed = fresh_seed()
    x, packed, absmax, code = make_case(seed, 5, 16, 128)
    assert linear.nf4_linear(x.bfloat16(), packed, absmax, code, 64, 16) is None  # fp32 activations only
    assert linear.nf4_linear(x[:, :96], packed[: 16 * 48], absmax[:24], code, 64, 16) is None  # K % blocksize
    assert linear.nf4_linear(x, packed, absmax, code, 64, 17) is None  # shapes disagree
    assert linear.nf4_linear(x, packed, absmax, code[:8], 64, 16) is None
    empty = linear.nf4_linear(x[:0], packed, absmax, code, 64, 16)
    assert empty is not None and empty.shape == (0, 16)


def test_strided_input_and_thread_counts() -> None:
    seed = fresh_seed()
    x, packed, absmax, code = make_case(seed, 33, 80, 256)
    wide = torch.cat([x, torch.randn(33, 7)], dim=1)[:, :256]  # rows 263 apart
    y = linear.nf4_linear(wide, packed, absmax, code, 64, 80)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(linear.nf4_linear(x, packed, absmax, code, 64, 80))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, y) for r in results), f"tiles are independent: same bits on any thread count; {seed=}"


@pytest.mark.parametrize("m", [1, 3, 4, 7, 33, 64])
@pytest.mark.parametrize("n, k", [(16, 64), (49, 576), (576, 576), (1000, 1536), (3, 128)])
def test_dense_matches_linear(m: int, n: int, k: int) -> None:
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    y = linear.dense_linear(x, w)
    why = f"seed={seed} M={m} N={n} K={k}"
    ref = torch.nn.functional.linear(x, w)
    torch.testing.assert_close(y, ref, atol=2e-5 * k ** 0.5, rtol=1e-5, msg=lambda s: f"{s}\n{why}")
    assert_near_fp64(y, ref, x.double() @ w.double().t(), why)


def test_dense_layer_routing_and_fallbacks() -> None:
    """DenseLinear takes the kernel for up to FUSED_MAX_TOKENS rows, F.linear above and in reference mode."""
    from server.model.quant import DenseLinear

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    layer = DenseLinear(torch.randn(80, 192, generator=g), torch.randn(80, generator=g))
    x = torch.randn(3, 5, 192, generator=g)
    want = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), want, atol=1e-4, rtol=1e-5, msg=lambda s: f"{s}\nseed={seed}")
    long = torch.randn(linear.FUSED_MAX_TOKENS + 1, 192, generator=g)
    assert torch.equal(layer(long), torch.nn.functional.linear(long, layer.weight, layer.bias)), seed
    w = torch.randn(16, 40, generator=g)
    assert linear.dense_linear(torch.randn(2, 40, generator=g), w) is None  # K % 16
    assert linear.dense_linear(x.bfloat16(), layer.weight.bfloat16()) is None
    assert linear.dense_linear(x, layer.weight.t().contiguous().t()) is None  # no unit inner stride
    layer.kernels = kernels.backend("cpu", "torch")
    assert torch.equal(layer(x), want), f"reference mode is F.linear; seed={seed}"


PORTABLE_CHECK = """
import torch
from kernels import linear
from kernels.reference import nf4_linear_reference
from tests.test_kernels_cpu_build import run_portable_check
from tests.test_kernels_linear import make_case
for m, n, k in ((1, 16, 64), (33, 49, 576), (256, 100, 1536)):
    x, packed, absmax, code = make_case({seed} + m, m, n, k)
    y = linear.nf4_linear(x, packed, absmax, code, 64, n)
    torch.testing.assert_close(y, nf4_linear_reference(x, packed, absmax, code, 64, n), atol=2e-4 * k ** 0.5, rtol=1e-4)
    w = torch.randn(n, k)
    torch.testing.assert_close(linear.dense_linear(x, w), x @ w.t(), atol=2e-5 * k ** 0.5, rtol=1e-5)
print("portable ok")
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 -march levels")
@pytest.mark.parametrize("march", PORTABLE_MARCHES)
def test_portable_build_without_avx512_matches_reference(tmp_path, march: str) -> None:
    """The kernel built for AVX2 (8-lane intrinsics) and for plain x86-64 (the vector-extension path) in a fresh
    cache: every register-block shape, tails of the tile, the NF4 lookup."""
    run_portable_check(PORTABLE_CHECK, tmp_path, march)
    assert len(list((tmp_path / "kernels").glob("linear-*.so"))) == 1
