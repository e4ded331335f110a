"""LoRA, DoRA and LongLoRA are one family: one slot table set in the pool, one StepAdapter (one LoraBatchMeta) per
step, and a decode step mixing the three (plus base rows) takes the one fused base + LoRA call once per projection
group. Each sequence of such a step equals its own oracle (PEFT's PeftModel; for LongLoRA on transformers' linear
RoPE at the adapter's factor), dense and NF4, and the same tokens come out with the fused call switched off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernels import projection as projection_kernel
from kernels.linear import FUSED_MAX_TOKENS
from server.adapters.kinds import lora_step
from server.config import AdapterLimits, AdapterPoolConfig, EngineConfig, ModelConfig
from server.engine.engine import Engine
from server.model.args import ModelArgs
from server.model.llama import LlamaModel
from tests.compiler import needs_compiler
from tests.kinds_adapters import make_dora_adapter
from tests.longlora_adapters import make_longlora_adapter
from tests.oracle_parity import LOGIT_ATOL, assert_run_matches, oracle_for, run_mixed
from tests.peft_adapters import ALL_PROJ, AdapterSpec, make_peft_adapter
from tests.test_kernels_projection import _fused_equals_path_off

GROUPS_PER_LAYER = 4  # q/k/v, o, gate/up, down
ROUTES = [None, "lora", "dora", "ll-all", None, "ll-norms", "dora-qv", "lora"]  # 8 sequences, two base


@pytest.fixture(scope="module")
def family(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-family")
    return {
        "lora": make_peft_adapter(tiny_llama_dir, AdapterSpec("lora", "lora", rank=8, alpha=16, targets=ALL_PROJ,
                                                              seed=71), root / "lora"),
        "dora": make_dora_adapter(tiny_llama_dir, root / "dora", rank=4, alpha=8, targets=ALL_PROJ, seed=72),
        "dora-qv": make_dora_adapter(tiny_llama_dir, root / "dora-qv", rank=8, alpha=4, targets=["q_proj", "v_proj"],
                                     seed=73, rslora=True),
        "ll-all": make_longlora_adapter(tiny_llama_dir, root / "ll-all", rank=8, alpha=16,
                                        targets=["q_proj", "v_proj"], seed=74, factor=2.0),
        "ll-norms": make_longlora_adapter(tiny_llama_dir, root / "ll-norms", rank=4, alpha=8, targets=ALL_PROJ,
                                          seed=75, factor=3.0, saved=["input_layernorm", "norm"]),
    }


def test_the_three_kinds_share_one_table_set(tiny_llama_dir: Path) -> None:
    engine = Engine.create(ModelConfig(path=str(tiny_llama_dir), quantize=False), EngineConfig(),
                           AdapterPoolConfig(device_slots=2, max_lora_rank=8))
    by_kind = engine.pool.tables.by_kind
    assert by_kind["LORA"] is by_kind["DORA"] is by_kind["LONGLORA"]
    assert sum(t is by_kind["LORA"] for t in engine.pool.tables.by_family.values()) == 1


class StepSpy:
    """Per forward: its token count, its StepAdapters, and the fused calls made during it (their gains)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps: list[tuple[int, list, list]] = []
        real_forward, real_call = LlamaModel.forward, projection_kernel.projection_group  # the CPU backend's fused call

        def forward(model, batch, *args, **kwargs):
            self.steps.append((batch.input_ids.shape[0], list(batch.adapters), []))
            return real_forward(model, batch, *args, **kwargs)

        def call(*args):
            if self.steps:
                self.steps[-1][2].append(args[-1])
            return real_call(*args)

        monkeypatch.setattr(LlamaModel, "forward", forward)
        monkeypatch.setattr(projection_kernel, "projection_group", call)


def _kinds_in(step: lora_step.LoraStep) -> set[str]:
    """Which family kinds the step's slots hold, read from the tables' per-slot extras."""
    tables = step.tables
    return {"DORA" if tables.dora.holds[s] else "LONGLORA" if tables.longlora.holds[s] else "LORA"
            for s in step.meta.seg_slots_list if s >= 0}


@needs_compiler
@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_mixed_family_step_matches_peft_through_one_fused_call_per_group(
        tiny_llama_dir: Path, family: dict[str, Path], quantize: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_model_parity import hf_model

    spy = StepSpy(monkeypatch)
    run = run_mixed(tiny_llama_dir, family, ROUTES, quantize, new_tokens=4, lengths=[5, 7, 6, 8, 3, 7, 4, 6])
    layers = ModelArgs.from_dir(tiny_llama_dir).num_layers
    mixed_steps = 0
    for tokens, adapters, calls in spy.steps:
        assert tokens <= FUSED_MAX_TOKENS, f"seed {run.seed}: the test needs decode-sized steps"
        if not adapters:  # a step of base sequences only (the engine may start before every request is in)
            assert calls == []
            continue
        assert len(adapters) == 1 and isinstance(adapters[0], lora_step.LoraStep), f"seed {run.seed}: {adapters}"
        assert len(calls) == GROUPS_PER_LAYER * layers, f"seed {run.seed}: {len(calls)} fused calls in a step"
        if _kinds_in(adapters[0]) == {"LORA", "DORA", "LONGLORA"}:
            mixed_steps += 1
            assert all(g is not None and any(x is not None for x in g) for g in calls), "DoRA's gains not fused"
    assert mixed_steps >= 2, f"seed {run.seed}: only {mixed_steps} steps held all three kinds"
    assert_run_matches(run, oracle_for(tiny_llama_dir, family, hf_model(tiny_llama_dir, quantize), quantize),
                       LOGIT_ATOL)


@needs_compiler
def test_mixed_family_steps_equal_the_two_call_path(tiny_llama_dir: Path, family: dict[str, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The same tokens with the fused call switched off (base, then the family's kernel, then DoRA's finish)."""
    _fused_equals_path_off(monkeypatch, tiny_llama_dir, family, ["lora", None, "dora", "ll-all", "dora-qv", None],
                           lambda call: call[-1] is not None and any(g is not None for g in call[-1]))


def test_a_lora_only_step_reads_no_extra(tiny_llama_dir: Path, family: dict[str, Path]) -> None:
    """With DoRA and LongLoRA adapters resident, a step of LoRA sequences multiplies no gain and renorms nothing."""
    from server.adapters.kinds.base import ChunkView, ContextLayout
    from server.adapters.peft_format import read_adapter
    from server.adapters.weights import AdapterWeights

    engine = Engine.create(ModelConfig(path=str(tiny_llama_dir), quantize=False), EngineConfig(),
                           AdapterPoolConfig(device_slots=3, max_lora_rank=8))
    args, tables = ModelArgs.from_dir(tiny_llama_dir), engine.pool.tables
    for slot, name in enumerate(("lora", "dora", "ll-all")):
        weights: AdapterWeights = tables.staged(read_adapter(family[name], args, AdapterLimits(8, 32)))
        tables.ensure(weights)
        tables.fill(slot, weights)
    family_tables = tables.by_kind["LORA"]
    assert family_tables.dora.holds == [False, True, False] and family_tables.longlora.holds == [False, False, True]
    lora_only = lora_step.LoraStep(family_tables, [ChunkView(0, None, 0, 3, 1, ContextLayout())], 5,
                                   torch.device("cpu"))
    assert lora_only.gain_rows is None and lora_only.long is None
    assert lora_only.fused_gains(0, ("q_proj", "k_proj", "v_proj")) is None
    y = torch.randn(5, args.hidden_size)
    assert lora_only.norm(torch.randn(5, args.hidden_size), y, 0, "input_layernorm", None) is y
    mixed = lora_step.LoraStep(family_tables, [ChunkView(0, None, 0, 2, 0, ContextLayout()),
                                               ChunkView(1, None, 0, 2, 2, ContextLayout()),
                                               ChunkView(2, None, 0, 1, 4, ContextLayout())], 6, torch.device("cpu"))
    assert mixed.gain_rows.tolist() == [0, 0, 1, 1, 2, 3]  # 3 = the all-ones row of tokens outside the family
    assert mixed.long is not None and mixed.long.mine.tolist() == [False] * 4 + [True, False]
