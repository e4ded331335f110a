"""kernels/projection.py: a projection group's base matmuls and LoRA deltas in one compiled call, against the two
calls in turn (kernels.linear, then kernels.lora_apply: the same sums, so bit-identical) and an fp64 loop oracle;
and the engine's decode steps through it equal to the two-call path. Fresh random inputs; the seed is printed on
failure (SEED=N replays it)."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

import kernels
from bench.workloads import sample_adapter_ids
from kernels import build_lora_meta
from kernels.cpu import cpu_apply_plan
from kernels.linear import dense_linear, nf4_linear
from kernels.projection import dense_spec, nf4_spec, projection_group
from tests.compiler import needs_compiler
from tests.lora_cases import N_SLOTS, POPULARITY, fresh_seed
from tests.test_kernels_cpu_build import PORTABLE_MARCHES, run_portable_check

pytestmark = needs_compiler

K = 128  # a multiple of the NF4 block size (64)
OUTS = (80, 40, 136)  # tiles of 16 rows with and without a tail


class Group:
    """One random group: base weights (dense or NF4), LoRA tables for the projections in `present` (rank-major B
    seen through a transpose, strided layer views as in the pool), slots (20% no adapter), x."""

    def __init__(self, seed: int, n_tokens: int, popularity: str, nf4: bool, present: tuple[int, ...],
                 table_dtype: torch.dtype = torch.float32, grouped: bool = True, max_rank: int = 16) -> None:
        rng = np.random.default_rng(seed)
        g = torch.Generator().manual_seed(seed)
        ids = np.where(rng.random(n_tokens) < 0.2, -1, sample_adapter_ids(popularity, n_tokens, N_SLOTS, rng))
        slots = torch.tensor(ids, dtype=torch.int32)
        self.slots = torch.sort(slots, stable=True).values if grouped else slots
        self.ranks = [int(r) for r in rng.integers(1, max_rank + 1, N_SLOTS)]
        self.meta = build_lora_meta(self.slots, self.ranks)
        self.x = torch.randn(n_tokens, K, generator=g)
        self.scales = torch.rand(N_SLOTS, generator=g) + 0.5
        self.weights = [torch.randn(n, K, generator=g) * 0.05 for n in OUTS]
        self.nf4 = None
        if nf4:
            import bitsandbytes as bnb

            self.nf4 = [bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4") for w in self.weights]
            self.weights = [bnb.functional.dequantize_4bit(p, s).float() for p, s in self.nf4]
        self.present = present
        self.a, self.b = [], []
        for i in present:
            a = torch.randn(N_SLOTS, 2, max_rank, K, generator=g).to(table_dtype)[:, 1]
            b = torch.randn(N_SLOTS, 2, max_rank, OUTS[i], generator=g).to(table_dtype)[:, 1].transpose(1, 2)
            self.a.append(a)
            self.b.append(b)

    def specs(self):
        if self.nf4 is None:
            return [dense_spec(w) for w in self.weights]
        return [nf4_spec(p, s.absmax, s.code, 64, n, K) for (p, s), n in zip(self.nf4, OUTS, strict=True)]

    def fused(self) -> list[torch.Tensor] | None:
        plan = cpu_apply_plan(self.a, self.b)
        return projection_group(self.x, self.specs(), plan, self.present, self.scales, self.meta)

    def two_calls(self) -> list[torch.Tensor]:
        if self.nf4 is None:
            ys = [dense_linear(self.x, w) for w in self.weights]
        else:
            ys = [nf4_linear(self.x, p, s.absmax, s.code, 64, n) for (p, s), n in zip(self.nf4, OUTS, strict=True)]
        ops = kernels.backend("cpu", "cpu")
        ops.lora_apply(self.x, self.a, self.b, self.scales, self.meta, [ys[i] for i in self.present])
        return ys

    def oracle(self) -> list[torch.Tensor]:
        """fp64: x @ W^T, plus each LoRA token's scale * (x A[:r]^T) B[:, :r]^T."""
        x = self.x.double()
        ys = [x @ w.double().T for w in self.weights]
        for a, b, i in zip(self.a, self.b, self.present, strict=True):
            for tok, s in enumerate(self.slots.tolist()):
                if s >= 0:
                    r = self.ranks[s]
                    ys[i][tok] += self.scales[s].double() * (b[s, :, :r].double() @ (a[s, :r].double() @ x[tok]))
        return ys


def _check(seed: int, group: Group, atol: float = 1e-4) -> None:
    fused = group.fused()
    if not group.meta.has_lora:  # every token drew "no adapter": nothing for this kernel (the caller runs the base)
        assert fused is None, f"seed={seed}"
        return
    assert fused is not None, f"seed={seed}: the kernel refused the call"
    for p, (got, two, want) in enumerate(zip(fused, group.two_calls(), group.oracle(), strict=True)):
        assert torch.equal(got, two), f"seed={seed} projection {p}: differs from the two calls in turn"
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-4,
                                   msg=lambda m, p=p: f"seed={seed} p={p}: {m}")


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("n_tokens", [1, 7, 33, 64])
def test_matches_two_calls_and_oracle(n_tokens: int, popularity: str, nf4: bool) -> None:
    seed = fresh_seed()
    _check(seed, Group(seed, n_tokens, popularity, nf4, present=(0, 1, 2), grouped=n_tokens % 2 == 0))


@pytest.mark.parametrize("present", [(0,), (1,), (0, 2), ()], ids=["first", "middle", "two", "none"])
def test_projections_without_tables_get_the_base_output(present: tuple[int, ...]) -> None:
    seed = fresh_seed()
    group = Group(seed, 9, "uniform", nf4=False, present=present)
    if not present:  # no stack: the plan cannot be made, and the caller never asks (LoraTables.group is None)
        assert cpu_apply_plan(group.a, group.b) is None
        return
    _check(seed, group)


def test_bf16_tables_and_ungrouped_tokens() -> None:
    seed = fresh_seed()
    _check(seed, Group(seed, 21, "zipf:1.5", nf4=False, present=(0, 1, 2), table_dtype=torch.bfloat16,
                       grouped=False))


def test_thread_counts_agree() -> None:
    """Which thread runs an item or a tile never changes a sum: 1..4 threads give the same bits."""
    seed = fresh_seed()
    group = Group(seed, 40, "distinct", nf4=True, present=(0, 1, 2), max_rank=64)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            results.append(group.fused())
    finally:
        torch.set_num_threads(before)
    for n, ys in zip((2, 3, 4), results[1:], strict=True):
        for a, b in zip(results[0], ys, strict=True):
            assert torch.equal(a, b), f"seed={seed}: {n} threads differ from 1"


def test_gains_equal_the_multiply_after() -> None:
    """DoRA's gain folded into the call (rows of a [layers, slots + 1, N] table, one projection without a gain)
    equals the two calls then y[tok] *= gain[slot] on each adapter token, bit for bit."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    group = Group(seed, 33, "zipf:1.5", nf4=True, present=(0, 1, 2), grouped=False)
    tables = [torch.rand(3, N_SLOTS + 1, n, generator=g) + 0.5 for n in OUTS]
    gains = [tables[0][1], None, tables[2][2]]
    got = projection_group(group.x, group.specs(), cpu_apply_plan(group.a, group.b), group.present, group.scales,
                           group.meta, gains)
    assert got is not None, f"seed={seed}"
    want = group.two_calls()
    for gain, y in zip(gains, want, strict=True):
        for tok, slot in enumerate(group.slots.tolist()):
            if gain is not None and slot >= 0:
                y[tok] *= gain[slot]
    for p, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"seed={seed} projection {p}"


@pytest.mark.parametrize("bad", ["bf16", "too few rows", "width", "column stride"])
def test_refuses_gains_it_cannot_read(bad: str) -> None:
    group = Group(fresh_seed(), 5, "uniform", nf4=False, present=(0, 1))
    gain = {"bf16": torch.ones(N_SLOTS + 1, OUTS[0], dtype=torch.bfloat16), "too few rows": torch.ones(2, OUTS[0]),
            "width": torch.ones(N_SLOTS + 1, OUTS[1]), "column stride": torch.ones(OUTS[0], N_SLOTS + 1).T}[bad]
    plan = cpu_apply_plan(group.a, group.b)
    assert projection_group(group.x, group.specs(), plan, (0, 1), group.scales, group.meta,
                            [gain, None, None]) is None


PORTABLE_CHECK = """
from tests.test_kernels_projection import Group, _check
_check({seed}, Group({seed}, 13, "zipf:1.5", nf4=False, present=(0, 2), grouped=False))
_check({seed}, Group({seed}, 40, "uniform", nf4=True, present=(0, 1, 2), table_dtype=__import__("torch").bfloat16))
print("portable ok")
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 -march levels")
@pytest.mark.parametrize("march", PORTABLE_MARCHES)
def test_portable_builds_match(tmp_path, march: str) -> None:
    """Built for AVX2 (x86-64-v3) and SSE2 (x86-64, the generic vector path) in a fresh cache, in a subprocess: the
    same checks (the two calls in turn built for the same ISA, and the fp64 oracle)."""
    run_portable_check(PORTABLE_CHECK, tmp_path, march)


def test_refuses_what_it_cannot_take() -> None:
    seed = fresh_seed()
    group = Group(seed, 5, "uniform", nf4=False, present=(0, 1))
    plan = cpu_apply_plan(group.a, group.b)
    specs = group.specs()
    assert projection_group(group.x.to(torch.bfloat16), specs, plan, (0, 1), group.scales, group.meta) is None
    assert projection_group(group.x, specs, plan, (0,), group.scales, group.meta) is None  # present != plan
    assert projection_group(group.x, specs, plan, (0, 2), group.scales, group.meta) is None  # out sizes differ
    no_lora = build_lora_meta(torch.full((5,), -1, dtype=torch.int32), group.ranks)
    assert projection_group(group.x, specs, plan, (0, 1), group.scales, no_lora) is None
    assert dense_spec(torch.randn(8, 24)) is None  # K not a multiple of 16
    assert dense_spec(torch.randn(8, 32, dtype=torch.bfloat16)) is None


def _fused_equals_path_off(monkeypatch: pytest.MonkeyPatch, model_dir, sources: dict[str, object],
                           names: list[str | None], saw_call) -> None:
    """The engine (model_dir, dense then NF4, `sources` registered by name) decodes the same tokens for one request
    per entry of `names` (None = base) with the one call as with it switched off, and the call ran:
    saw_call(args of each projection_group call) is True for at least one."""
    from kernels import projection as projection_kernel
    from server.adapters.kinds import lora_step
    from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
    from server.engine.engine import Engine
    from server.engine.request import GenerationRequest, SamplingParams
    from tests.engine_utils import collect

    def run(quantize: bool) -> list[list[int]]:
        engine = Engine.create(ModelConfig(path=str(model_dir), quantize=quantize), EngineConfig(),
                               AdapterPoolConfig(device_slots=4, max_lora_rank=16))
        for name, source in sources.items():
            engine.pool.register(name, source)
        engine.start()
        try:
            params = SamplingParams(max_new_tokens=6, ignore_eos=True)
            handles = [engine.submit(GenerationRequest(f"r{i}", tuple(range(3 + i, 12 + i)), params, adapter=a))
                       for i, a in enumerate(names)]
            return [collect(h).token_ids for h in handles]
        finally:
            engine.shutdown()

    seen: list[bool] = []
    real = projection_kernel.projection_group  # what the CPU backend's fused_projection calls
    monkeypatch.setattr(projection_kernel, "projection_group", lambda *a: seen.append(saw_call(a)) or real(*a))
    for quantize in (False, True):
        seen.clear()
        fused = run(quantize)
        assert any(seen), f"quantize={quantize}: the one call never ran (as the test needs it)"
        with monkeypatch.context() as m:
            m.setattr(lora_step.LoraStep, "project_with_base", lambda self, *a: None)
            assert run(quantize) == fused, f"quantize={quantize}"


def test_engine_steps_equal_the_two_call_path(tiny_llama_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of base and LoRA sequences (all seven projections, q/v only, k/o/up/down: groups with and without
    tables) decodes the same tokens through the fused path as with it switched off, and the fused path ran."""
    from bench.workloads import random_lora
    from server.model.args import ModelArgs

    args = ModelArgs.from_dir(tiny_llama_dir)
    sources = {}
    for i, modules in enumerate([None, ["q_proj", "v_proj"], ["k_proj", "o_proj", "up_proj", "down_proj"]]):
        weights = random_lora(args, 4 + 4 * i, seed=i, std=0.2)
        if modules:
            lora = weights.payload
            weights = replace(weights, payload=replace(
                lora, a={k: v for k, v in lora.a.items() if k[1] in modules},
                b={k: v for k, v in lora.b.items() if k[1] in modules}))
        sources[f"l{i}"] = weights
    _fused_equals_path_off(monkeypatch, tiny_llama_dir, sources, ["l0", None, "l1", "l2", "l0", None],
                           lambda call: True)


def test_base_layers_tile_spec_follows_their_weights() -> None:
    """A layer's spec is remade when its weight moves (loading copies weights into the arena once), so the fused
    call never reads a stale copy; a biased or bf16 layer has none."""
    from server.model.quant import make_linear

    g = torch.Generator().manual_seed(fresh_seed())
    layer = make_linear(torch.randn(48, 64, generator=g), None, quantize=False, dtype=torch.float32)
    first = layer.tile_spec()
    assert first is not None and first.fields[0] == layer.weight.data_ptr()
    assert layer.tile_spec() is first
    layer.weight.data = layer.weight.data.clone()
    assert layer.tile_spec().fields[0] == layer.weight.data_ptr() != first.fields[0]
    assert make_linear(torch.randn(48, 64), torch.randn(48), quantize=False, dtype=torch.float32).tile_spec() is None
    assert make_linear(torch.randn(48, 64), None, quantize=False, dtype=torch.bfloat16).tile_spec() is None
    nf4 = make_linear(torch.randn(48, 64, generator=g), None, quantize=True, dtype=torch.float32)
    spec = nf4.tile_spec()
    assert spec is not None and spec.fields[0] == 0 and spec.fields[2] == nf4.packed.data_ptr()
    x = torch.randn(5, 64, generator=g)
    assert torch.equal(nf4(x), nf4_linear(x, nf4.packed, nf4.quant_state.absmax, nf4.quant_state.code, 64, 48))


def test_engine_dora_steps_equal_the_two_call_path(tiny_llama_dir, tmp_path, monkeypatch: pytest.MonkeyPatch
                                                    ) -> None:
    """DoRA sequences (PEFT-made adapters on q/v and on every projection) beside base ones decode the same tokens with
    the gain folded into the one call as through the two calls and DoRA's finish, and the call got the gains."""
    from tests.kinds_adapters import make_dora_adapter

    all_seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    sources = {f"d{i}": make_dora_adapter(tiny_llama_dir, tmp_path / f"d{i}", rank=4, alpha=8.0, targets=t, seed=i)
               for i, t in enumerate((["q_proj", "v_proj"], all_seven))}
    _fused_equals_path_off(monkeypatch, tiny_llama_dir, sources, ["d0", None, "d1", "d1", None, "d0"],
                           lambda call: call[-1] is not None and any(g is not None for g in call[-1]))
