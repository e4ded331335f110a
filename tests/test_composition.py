"""Adapters composed per request (server/engine/composition.py, kernels/compose.py): a request weighting several
LoRA adapters gets the base plus the weighted sum of their deltas, in the same batch as plain single-adapter and
base sequences. Oracle: PEFT's PeftModel with the same adapters active at once (base_model.set_adapter([...])) and
each one's scaling multiplied by its weight. Random compositions (2-4 parts, mixed ranks, targets and rsLoRA,
weights in [-1, 2]) are drawn from a seed that failures print; `SEED=N` replays one."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch

import kernels
from kernels import projection as projection_kernel
from kernels.compose import build_compose_meta, compose_apply, compose_reference
from server.adapters.kinds import lora_step
from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
from server.engine.engine import Engine
from server.engine.request import AdapterPart, GenerationRequest, InvalidRequest, SamplingParams, UnknownAdapterRequest
from server.model.llama import LlamaModel
from tests.compiler import needs_compiler
from tests.engine_utils import collect
from tests.kinds_adapters import make_dora_adapter
from tests.oracle_parity import LOGIT_ATOL, assert_close_to_oracle, draw_seed
from tests.peft_adapters import ALL_PROJ, AdapterSpec, make_peft_adapter

# (name, rank, alpha, targets, rslora): mixed ranks and targets
LORAS = [("c0", 8, 16, ALL_PROJ, False), ("c1", 4, 8, ["q_proj", "v_proj"], False),
         ("c2", 2, 4, ["o_proj", "down_proj", "up_proj"], True), ("c3", 8, 8, ["k_proj", "gate_proj"], False),
         ("c4", 4, 16, ALL_PROJ, True), ("c5", 6, 12, ["q_proj", "o_proj", "down_proj"], False)]
NF4_LOGIT_ATOL = 1e-3
GROUPS_PER_LAYER = 4  # q/k/v, o, gate/up, down
RUNS = 5  # x COMPOSED_PER_RUN = 20 random compositions per mode
COMPOSED_PER_RUN = 4


@pytest.fixture(scope="module")
def loras(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compose")
    return {name: make_peft_adapter(tiny_llama_dir, AdapterSpec(name, "lora", rank=r, alpha=a, targets=t, rslora=rs,
                                                                seed=90 + i), root / name)
            for i, (name, r, a, t, rs) in enumerate(LORAS)}


def _engine(model_dir: Path, quantize: bool, loras: dict[str, Path], slots: int = 8) -> Engine:
    engine = Engine.create(ModelConfig(path=str(model_dir), quantize=quantize), EngineConfig(),
                           AdapterPoolConfig(device_slots=slots, max_lora_rank=8))
    for name, path in loras.items():
        engine.pool.register(name, path)
    return engine


def _draw(g: torch.Generator) -> tuple[AdapterPart, ...]:
    n = int(torch.randint(2, 5, (1,), generator=g))
    names = [LORAS[int(i)][0] for i in torch.randperm(len(LORAS), generator=g)[:n]]
    weights = (torch.rand(n, generator=g) * 3 - 1).tolist()  # [-1, 2]
    return tuple(AdapterPart(name, round(w, 3)) for name, w in zip(names, weights, strict=True))


def _peft_oracle(base: torch.nn.Module, loras: dict[str, Path], parts: tuple[AdapterPart, ...], ids: list[int],
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PEFT with every part active at once, each adapter's scaling multiplied by its weight: logits [len(ids), V]
    (dtype float64: a dense base and the adapters in float64, the fallback of assert_close_to_oracle)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(copy.deepcopy(base), loras[parts[0].key], adapter_name=parts[0].key)
    for part in parts[1:]:
        model.load_adapter(loras[part.key], adapter_name=part.key)
    model.base_model.set_adapter([p.key for p in parts])
    weights = {p.key: p.weight for p in parts}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, w in weights.items():
                if name in module.scaling:
                    module.scaling[name] *= w
    model.eval().to(dtype)
    with torch.no_grad():
        mask = torch.ones(1, len(ids), dtype=torch.long)
        return model(input_ids=torch.tensor([ids]), attention_mask=mask).logits[0].float()


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_random_compositions_match_peft_in_one_mixed_batch(tiny_llama_dir: Path, loras: dict[str, Path],
                                                           quantize: bool) -> None:
    from tests.test_model_parity import hf_model

    base = hf_model(tiny_llama_dir, quantize)
    # fp32, differences of summation order only; dense falls back to the float64 oracle where 2-4 random parts of
    # weight up to 2 make fp32 itself round further (seen: 3e-4 on 47 of 196,608 logits, seed 903212); NF4 has no
    # float64 oracle, hence its wider bound
    atol = NF4_LOGIT_ATOL if quantize else LOGIT_ATOL
    seed = draw_seed()
    g = torch.Generator().manual_seed(seed)
    engine = _engine(tiny_llama_dir, quantize, loras)
    seen: dict[str, list[torch.Tensor]] = {}
    engine.on_logits = lambda seqs, logits: [seen.setdefault(s.request_id, []).append(logits[i].clone())
                                              for i, s in enumerate(seqs)]
    engine.start()
    try:
        for run in range(RUNS):
            # one mixed batch: the compositions, a plain adapter, a weighted single adapter and the base (run 0:
            # compositions and the base only, so the family's plain call has no token)
            routes: list[tuple[AdapterPart, ...] | str | None] = [_draw(g) for _ in range(COMPOSED_PER_RUN)]
            routes += [None] if run == 0 else ["c1", (AdapterPart("c0", -0.5),), None]
            prompts = [torch.randint(0, engine.args.vocab_size, (int(torch.randint(2, 12, (1,), generator=g)),),
                                     generator=g).tolist() for _ in routes]
            params = SamplingParams(max_new_tokens=4, ignore_eos=True)
            handles = [engine.submit(GenerationRequest(
                f"r{run}-{i}", tuple(p), params, adapter=r if isinstance(r, str) else None,
                parts=r if isinstance(r, tuple) else ())) for i, (p, r) in enumerate(zip(prompts, routes, strict=True))]
            outputs = [collect(h) for h in handles]
            for i, (route, prompt, out) in enumerate(zip(routes, prompts, outputs, strict=True)):
                assert out.finish_reason == "length", f"seed {seed}: {out}"
                full = prompt + list(out.token_ids)
                parts = (AdapterPart(route),) if isinstance(route, str) else route
                if parts is None:
                    with torch.no_grad():
                        expected = base(torch.tensor([full])).logits[0].float()
                else:
                    expected = _peft_oracle(base, loras, parts, full)
                expected = expected[len(prompt) - 1: len(full) - 1]
                what = f"seed {seed}, run {run}, {route}"

                def exact(parts=parts, full=full, prompt=prompt) -> torch.Tensor | None:
                    n = len(prompt)
                    if quantize:
                        return None
                    if parts is None:
                        with torch.no_grad():
                            return copy.deepcopy(base).double()(torch.tensor([full])).logits[0, n - 1: -1].float()
                    return _peft_oracle(base, loras, parts, full, torch.float64)[n - 1: -1]

                assert_close_to_oracle(torch.stack(seen[f"r{run}-{i}"]), expected, atol, exact, what)
                assert list(out.token_ids) == expected.argmax(-1).tolist(), what
    finally:
        engine.shutdown()
    assert all(e.pins == 0 for e in engine.pool._entries.values()), "a part is still pinned after its request"


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["auto", "reference", "triton"])
def test_compose_apply_equals_the_reference(tokens: int, dtype: torch.dtype, mode: str) -> None:
    """The pairs' one call on each kernel path (auto: the compiled kernel on CPU; Triton under TRITON_INTERPRET on
    CPU) against the per-pair loop."""
    backend = kernels.backend("cpu", mode)
    seed = draw_seed()
    g = torch.Generator().manual_seed(seed)
    slots, rank, n_in, outs = 5, 8, 24, (16, 40)
    a_stacks = [(torch.randn(slots, rank, n_in, generator=g) * 0.3).to(dtype) for _ in outs]
    b_stacks = [(torch.randn(slots, out, rank, generator=g) * 0.3).to(dtype) for out in outs]
    scales = torch.rand(slots, generator=g) + 0.5
    ranks = [8, 2, 4, 8, 1]
    for a, b in zip(a_stacks, b_stacks, strict=True):  # zero padding past each slot's rank, as the pool's tables
        for slot, r in enumerate(ranks):
            a[slot, r:] = 0
            b[slot, :, r:] = 0
    x = torch.randn(tokens + 2, n_in, generator=g)
    pairs = [(i, int(s), float(w)) for i in range(tokens) for s, w in
             zip(torch.randperm(slots, generator=g)[:3], torch.rand(3, generator=g) * 3 - 1, strict=True)]
    ys = [torch.randn(tokens + 2, out, generator=g) for out in outs]
    expected = compose_reference(x, a_stacks, b_stacks, scales, pairs, ys, ranks)
    group = backend.lora_group(a_stacks, b_stacks)
    got = compose_apply(x, group, scales, build_compose_meta(pairs, ranks), [y.clone() for y in ys], backend)
    for e, o, y in zip(expected, got, ys, strict=True):
        torch.testing.assert_close(o, e, atol=1e-4 if dtype == torch.float32 else 3e-2, rtol=1e-4,
                                   msg=lambda m: f"seed {seed}: {m}")
        assert torch.equal(o[tokens:], y[tokens:]), f"seed {seed}: rows outside the pairs changed"


def test_bad_compositions_are_refused(tiny_llama_dir: Path, loras: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(tiny_llama_dir, False, {**loras, "dora": make_dora_adapter(
        tiny_llama_dir, tmp_path / "dora", rank=4, alpha=8, targets=["q_proj"], seed=3)}, slots=3)

    def submit(*parts: AdapterPart, adapter: str | None = None) -> None:
        engine.submit(GenerationRequest("bad", (1, 2, 3), adapter=adapter, parts=parts))

    cases = [
        ((AdapterPart("c0"), AdapterPart("c1"), AdapterPart("c2"), AdapterPart("c3"), AdapterPart("c4")),
         "at most 4"),
        ((AdapterPart("c0"), AdapterPart("c1"), AdapterPart("c2"), AdapterPart("c3")), "3 device slots"),
        ((AdapterPart("c0"), AdapterPart("c0", 0.5)), "repeats"),
        ((AdapterPart("c0", float("nan")),), "finite"),
        ((AdapterPart("c0", float("inf")), AdapterPart("c1")), "finite"),
        ((AdapterPart("c0", 101.0),), "finite"),
        ((AdapterPart("c0"), AdapterPart("dora")), "DORA"),
        ((AdapterPart("dora", 0.5),), "DORA"),
    ]
    for parts, message in cases:
        with pytest.raises(InvalidRequest, match=message):
            submit(*parts)
    with pytest.raises(InvalidRequest, match="not both"):
        submit(AdapterPart("c0"), adapter="c1")
    with pytest.raises(UnknownAdapterRequest, match="nope"):
        submit(AdapterPart("c0"), AdapterPart("nope"))
    assert all(e.users == 0 for e in engine.pool._entries.values()), "a refused request left a part reserved"


def test_two_compositions_holding_half_of_each_other_both_finish(tiny_llama_dir: Path, loras: dict[str, Path]
                                                                  ) -> None:
    """Two slots; c0 and c2 in them, each reserved by a waiting composition that needs the other's neighbour
    (R1 = c0 + c1, R2 = c2 + c3): without a part displacing an unpinned waiting adapter neither could ever run."""
    from tests.test_pool import make_pool, wait_for

    pool = make_pool(tiny_llama_dir, device_slots=2)
    for name, path in loras.items():
        pool.register(name, path)
    for key in ("c0", "c2", "c1", "c3"):  # submit order: c0 and c2 reach the two slots first
        pool.reserve(key)
        if key in ("c0", "c2"):
            wait_for(lambda k=key: pool.residency(k) == "device")
    for _ in range(20):  # a single adapter's acquire never takes a waiting request's slot
        assert pool.acquire("c1") is None
        time.sleep(0.005)
    lease = acquire_soon_displacing(pool, "c1")
    assert lease is not None and pool.residency("c1") == "device"
    assert acquire_soon_displacing(pool, "c3") is not None  # c1 stays pinned: c3 displaces the other waiter
    assert pool.residency("c1") == "device" and pool.residency("c3") == "device"
    pool.close()

    engine = _engine(tiny_llama_dir, False, loras, slots=2)  # end to end: two compositions, two slots
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=3, ignore_eos=True)
        handles = [engine.submit(GenerationRequest(f"half-{i}", (1, 2, 3), params, parts=(
            AdapterPart(f"c{2 * i}", 0.5), AdapterPart(f"c{2 * i + 1}", 0.5)))) for i in range(2)]
        assert [collect(h, timeout=60).finish_reason for h in handles] == ["length", "length"]
    finally:
        engine.shutdown()


def acquire_soon_displacing(pool, key: str):
    from tests.test_pool import wait_for

    leases = []
    wait_for(lambda: leases.append(pool.acquire(key, displace=True)) or leases[-1] is not None)
    return leases[-1]


@needs_compiler
def test_a_decode_step_keeps_the_fused_call_beside_the_composition(tiny_llama_dir: Path, loras: dict[str, Path],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain tokens take the one fused base + LoRA call per projection group; the composed pairs one more call."""
    calls: list[list[str]] = []
    real_fused, real_compose = projection_kernel.projection_group, lora_step.compose_apply  # the CPU fused call

    def fused(*args, **kwargs):
        calls[-1].append("fused")
        return real_fused(*args, **kwargs)

    def compose(*args, **kwargs):
        calls[-1].append("compose")
        return real_compose(*args, **kwargs)

    real_forward = LlamaModel.forward

    def forward(model, batch, *args, **kwargs):
        calls.append([])
        return real_forward(model, batch, *args, **kwargs)

    monkeypatch.setattr(projection_kernel, "projection_group", fused)
    monkeypatch.setattr(lora_step, "compose_apply", compose)
    monkeypatch.setattr(LlamaModel, "forward", forward)
    engine = _engine(tiny_llama_dir, False, loras)
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=4, ignore_eos=True)
        handles = [engine.submit(GenerationRequest("plain", (1, 2, 3), params, adapter="c1")),
                   engine.submit(GenerationRequest("mix", (4, 5), params, parts=(AdapterPart("c0", 0.5),
                                                                                  AdapterPart("c2", -1.0))))]
        for h in handles:
            collect(h)
    finally:
        engine.shutdown()
    groups = GROUPS_PER_LAYER * engine.args.num_layers
    both = [c for c in calls if c.count("fused") == groups and c.count("compose") == groups]
    assert both, f"no step took the fused call and the composition's call per group: {calls}"


def _cached_and_tokens(engine: Engine, request_id: str, prompt: tuple[int, ...], parts: tuple[AdapterPart, ...]
                       ) -> tuple[int, list[int]]:
    handle = engine.submit(GenerationRequest(request_id, prompt, SamplingParams(max_new_tokens=3, ignore_eos=True),
                                             parts=parts))
    tokens = []
    while True:
        event = handle.get(timeout=120)
        tokens += event.token_ids
        if event.finished:
            return event.cached_prompt_tokens, tokens


def test_the_prefix_cache_keys_a_composition_by_its_parts_and_weights(tiny_llama_dir: Path,
                                                                       loras: dict[str, Path]) -> None:
    """A composition's KV blocks are reused only by the same parts with the same weights in the same order; the
    outputs equal a cold engine's (the cache switched off is the oracle)."""
    prompt = tuple(range(3, 3 + 40))  # two full 16-token blocks and a tail
    a, b = AdapterPart("c0", 0.5), AdapterPart("c1", 1.5)
    runs = [("first", (a, b)), ("same", (a, b)), ("weight", (AdapterPart("c0", 0.25), b)), ("order", (b, a)),
            ("other", (a, AdapterPart("c2", 1.5)))]
    engine = _engine(tiny_llama_dir, False, loras)
    engine.start()
    try:
        got = {name: _cached_and_tokens(engine, name, prompt, parts) for name, parts in runs}
    finally:
        engine.shutdown()
    cold = Engine.create(ModelConfig(path=str(tiny_llama_dir), quantize=False), EngineConfig(prefix_cache=False),
                         AdapterPoolConfig(device_slots=8, max_lora_rank=8))
    for name, path in loras.items():
        cold.pool.register(name, path)
    cold.start()
    try:
        expected = {name: _cached_and_tokens(cold, name, prompt, parts)[1] for name, parts in runs}
    finally:
        cold.shutdown()
    assert got["first"][0] == 0 and got["same"][0] == 32, got
    assert all(got[name][0] == 0 for name in ("weight", "order", "other")), got
    assert {name: tokens for name, (_, tokens) in got.items()} == expected
    assert got["weight"][1] != got["first"][1] or got["other"][1] != got["first"][1], "the weights changed nothing"
