"""The kernel dispatcher: one KernelBackend per (mode, device), resolved once and kept by every layer of the model;
the torch, cpu and triton backends (triton interpreted on CPU) give the same results op by op."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.meta import build_lora_meta
from tests.compiler import MISSING
from tests.lora_cases import fresh_seed, make_case
from tests.test_kernels_pointwise import rope_case
from tests.test_paged_attention import make_case as attention_case

MODES = ["torch", "triton"] + ([] if MISSING else ["cpu"])


def test_a_backend_is_resolved_once_per_mode_and_device() -> None:
    assert kernels.backend("cpu", "torch") is kernels.backend(torch.device("cpu"), "torch")
    assert kernels.backend("cpu", "reference").name == "torch"
    assert kernels.backend("cpu").name == ("torch" if MISSING else "cpu")  # auto (the suite's default)
    with pytest.raises(ValueError, match="kernel mode 'fast'"):
        kernels.backend("cpu", "fast")


def test_the_model_keeps_its_devices_backend(tiny_llama_dir) -> None:
    from server.model.args import ModelArgs
    from server.model.loader import build_model

    for quantize in (False, True):
        model = build_model(tiny_llama_dir, ModelArgs.from_dir(tiny_llama_dir), torch.float32, quantize, "cpu")
        holders = [m for m in model.modules() if hasattr(m, "kernels")]
        assert len(holders) > 3 * model.args.num_layers
        assert all(m.kernels is kernels.backend("cpu") for m in holders), quantize
    nf4 = next(m for m in model.modules() if hasattr(m, "nf4_weights"))
    first = nf4.nf4_weights()
    assert first.packed is nf4.packed and nf4.nf4_weights() is first  # made once while the codes stay put
    nf4.packed = nf4.packed.clone()  # moved (as loading moves them into the weights arena)
    assert nf4.nf4_weights().packed is nf4.packed


@pytest.mark.parametrize("mode", MODES)
def test_lora_ops_agree_with_the_reference(mode: str) -> None:
    seed = fresh_seed()
    ops, ref = kernels.backend("cpu", mode), kernels.backend("cpu", "torch")
    # padded ranks only: the Triton kernels multiply the whole padded rank (the pool zero-pads it)
    slots, x, a, b, scales, y0, ranks = make_case(seed, 19, 16, "zipf:1.5", torch.float32, True, False)
    meta = build_lora_meta(slots, ranks)
    t = ops.lora_shrink(x, a, meta, None)
    torch.testing.assert_close(t, ref.lora_shrink(x, a, meta, None), atol=1e-4, rtol=1e-4, msg=f"seed={seed}")
    y = ops.lora_expand(t, b, scales, meta, y0.clone())
    y_ref = ref.lora_expand(t, b, scales, meta, y0.clone())
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4, msg=f"seed={seed}")
    (y_apply,) = ops.lora_apply(x, [a], [b], scales, meta, [y0.clone()])
    torch.testing.assert_close(y_apply, y_ref, atol=1e-4, rtol=1e-4, msg=f"apply seed={seed}")
    no_lora = build_lora_meta(torch.full((19,), -1, dtype=torch.int32))
    assert torch.count_nonzero(ops.lora_shrink(x, a, no_lora, None)) == 0
    assert torch.equal(ops.lora_expand(t, b, scales, no_lora, y0.clone()), y0)


@pytest.mark.parametrize("mode", MODES)
def test_pointwise_linear_and_attention_agree_with_the_reference(mode: str) -> None:
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    ops, ref = kernels.backend("cpu", mode), kernels.backend("cpu", "torch")
    x, w, bias = torch.randn(5, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    torch.testing.assert_close(ops.linear(x, w, bias), ref.linear(x, w, bias), atol=1e-5, rtol=1e-5)
    norm_w = torch.randn(64, generator=g)
    torch.testing.assert_close(ops.rms_norm(x, norm_w, 1e-6), ref.rms_norm(x, norm_w, 1e-6), atol=1e-5, rtol=1e-5)
    q, k, v, cos, sin, kv_slots, k_cache, v_cache = rope_case(seed, 6, 4, 2, 32, 20)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    out = ops.rope_and_cache(q, k, v, cos, sin, kv_slots, k_cache, v_cache)
    want = ref.rope_and_cache(q, k, v, cos, sin, kv_slots, k_ref, v_ref)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, msg=f"seed={seed}")
    torch.testing.assert_close(k_cache, k_ref, atol=1e-5, rtol=1e-5, msg=f"seed={seed}")
    q, k_cache, v_cache, meta, _ = attention_case(seed, [(1, 40), (3, 17)], 4, 2, 32, 16, torch.float32)
    torch.testing.assert_close(ops.paged_attention(q, k_cache, v_cache, meta, 0.2),
                               ref.paged_attention(q, k_cache, v_cache, meta, 0.2), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="does not fit"):  # every backend checks the shapes
        ops.paged_attention(q, k_cache[:, :1].expand(-1, 3, -1), k_cache[:, :1].expand(-1, 3, -1), meta, 0.2)
