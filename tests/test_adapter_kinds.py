"""The adapter-kind interface: a kind registered from outside (a toy per-token output scale on down_proj)
is read, slotted, batched and applied with no change to engine, runner, pool or model code; and the
generic code names no kind."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapters import kinds
from server.adapters.kinds import AdapterFormatError, AdapterKind, AdapterLimits, ChunkView, SlotTables
from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams
from server.model.args import ModelArgs
from server.model.batch import StepAdapter
from tests.engine_utils import collect

ROOT = Path(__file__).resolve().parent.parent


class ToyTables(SlotTables):
    def __init__(self, num_slots: int, dtype: torch.dtype, device: str) -> None:
        self.scale = torch.ones(num_slots + 1, dtype=dtype, device=device)  # row num_slots = no toy adapter

    def fill(self, slot: int, payload: float) -> None:
        self.scale[slot] = payload

    def clear(self, slot: int) -> None:
        self.scale[slot] = 1.0


class ToyStep(StepAdapter):
    def __init__(self, tables: ToyTables, rows: torch.Tensor) -> None:
        self.tables, self.rows = tables, rows

    def project_output(self, x: torch.Tensor, y: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        return y * self.tables.scale[self.rows][:, None] if module == "down_proj" else y


class ToyScaleKind(AdapterKind):
    """y = down_proj(x) * s for the tokens of sequences using the adapter."""

    name = "TOY_SCALE"
    peft_types = ("TOY_SCALE",)

    def read(self, cfg: dict, tensors: dict[str, torch.Tensor], args: ModelArgs, limits: AdapterLimits) -> float:
        if set(tensors) != {"output_scale"} or tensors["output_scale"].shape != (1,):
            raise AdapterFormatError("a toy adapter holds exactly one tensor 'output_scale' of shape [1]")
        return float(tensors["output_scale"][0])

    def check_tensor_header(self, key, shape, args, limits) -> bool:
        if key != "output_scale":
            return False
        if shape != (1,):
            raise AdapterFormatError(f"output_scale has shape {shape}; it must be [1]")
        return True

    def tensors(self, payload: float) -> list[torch.Tensor]:
        return [torch.tensor([payload])]

    def new_tables(self, args, num_slots, limits, dtype, device) -> ToyTables:
        return ToyTables(num_slots, dtype, device)

    def step(self, tables: ToyTables, chunks: list[ChunkView], num_tokens: int, device) -> ToyStep:
        rows = torch.full((num_tokens,), tables.scale.shape[0] - 1, dtype=torch.int64)
        for c in chunks:
            rows[c.offset : c.offset + c.count] = c.slot
        return ToyStep(tables, rows.to(device))


@pytest.fixture
def toy_kind():
    kind = kinds.register(ToyScaleKind())  # the one registration line a new kind needs
    yield kind
    kinds.unregister(kind.name)


def scaled_copy(model_dir: Path, out: Path, scale: float) -> Path:
    """The oracle: the same checkpoint with every down_proj weight multiplied by `scale`."""
    shutil.copytree(model_dir, out)
    weights = load_file(out / "model.safetensors")
    for key in weights:
        if key.endswith("mlp.down_proj.weight"):
            weights[key] = weights[key] * scale
    save_file(weights, out / "model.safetensors")
    return out


def greedy(engine: Engine, prompts: list[list[int]], adapters: list[str | None]) -> list[list[int]]:
    handles = [engine.submit(GenerationRequest(f"toy-{i}", tuple(p), SamplingParams(12, ignore_eos=True), adapter=a))
               for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))]
    return [collect(h).token_ids for h in handles]


def test_a_kind_registered_from_outside_is_served_in_a_mixed_batch(toy_kind, tiny_llama_dir: Path,
                                                                   tmp_path: Path) -> None:
    adapter = tmp_path / "toy"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "TOY_SCALE"}))
    save_file({"output_scale": torch.tensor([0.25])}, adapter / "adapter_model.safetensors")
    seed = int(torch.randint(0, 10**6, ()))
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]

    def engine_on(model_dir: Path) -> Engine:
        eng = Engine.create(ModelConfig(path=str(model_dir), quantize=False), EngineConfig(),
                            AdapterPoolConfig(device_slots=2))
        eng.start()
        return eng

    engine = engine_on(tiny_llama_dir)
    try:
        engine.pool.register("toy", adapter)
        mixed = greedy(engine, prompts, ["toy", None, "toy", None])
        base = greedy(engine, prompts, [None] * 4)
    finally:
        engine.shutdown()
    oracle_engine = engine_on(scaled_copy(tiny_llama_dir, tmp_path / "scaled", 0.25))
    try:
        oracle = greedy(oracle_engine, prompts, [None] * 4)
    finally:
        oracle_engine.shutdown()
    assert mixed[0] == oracle[0] and mixed[2] == oracle[2], f"seed {seed}"
    assert mixed[1] == base[1] and mixed[3] == base[3], f"seed {seed}"
    assert mixed[0] != base[0] or mixed[2] != base[2], f"seed {seed}: the toy scale changed nothing"


# Generic code: everything but the kinds' own modules and the trainer (which trains one method per kind).
GENERIC = ("server", "kernels", "clients")
PER_KIND = ("server/adapters/kinds/", "server/trainer/")
# imports of the kinds package that generic code may make: the interface and PEFT's shared key parser
SHARED_KIND_MODULES = ("base", "peft_keys")


def _kind_module_classes() -> list[str]:
    """The classes each kind module defines (LoraWeights, IA3Tables, BottleneckStep, ...)."""
    names = set()
    for module in pkgutil.iter_modules(kinds.__path__):
        if module.name not in SHARED_KIND_MODULES:
            mod = importlib.import_module(f"server.adapters.kinds.{module.name}")
            names |= {n for n, o in vars(mod).items() if inspect.isclass(o) and o.__module__ == mod.__name__}
    return sorted(names)


def _generic_files() -> list[Path]:
    files = [p for folder in GENERIC for p in sorted((ROOT / folder).rglob("*.py"))]
    return [p for p in files if not p.relative_to(ROOT).as_posix().startswith(PER_KIND)]


def test_generic_code_names_no_kind() -> None:
    """server/engine and server/model never name a kind (not even inside a longer name), and server/model imports
    nothing from server/engine; no generic code (server/ outside the kinds and the trainer, kernels/, clients/)
    names a kind as a word (LORA, not MAX_LORA_RANK), a kind module's class or a kind module. The name a version
    stored before kinds were recorded defaults to lives in server/adapters/kinds/__init__.py (LEGACY_KIND)."""
    names = [k.name for k in kinds.registered()] + ["AdapterKind.", "LoraWeights", "IA3Weights", "PrefixWeights"]
    pattern = re.compile("|".join(re.escape(n) for n in names))
    for folder in ("server/engine", "server/model"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            assert not pattern.search(text), f"{path} names an adapter kind: {pattern.search(text)[0]}"
            if folder == "server/model":
                assert "server.engine" not in text, f"{path} imports from server/engine"
    words = [k.name for k in kinds.registered()] + _kind_module_classes()
    assert {"LORA", "IA3", "LoraWeights", "BottleneckTables"} <= set(words)  # the scan looks for something
    word = re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b|\bAdapterKind\.")
    module = re.compile(r"\bserver\.adapters\.kinds\.(?!(?:" + "|".join(SHARED_KIND_MODULES) + r")\b)\w+")
    files = _generic_files()
    assert ROOT / "server/adapters/registry.py" in files and ROOT / "clients/results.py" in files
    assert ROOT / "server/adapters/kinds/lora.py" not in files
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            found = word.search(line) or module.search(line)
            assert found is None, f"{path.relative_to(ROOT)}:{n} names an adapter kind: {found[0]}"


def test_the_guard_sees_a_kind_as_a_word_only() -> None:
    """The word scan above flags a kind's name and a kind module's class, not a longer name containing one."""
    words = [k.name for k in kinds.registered()] + _kind_module_classes()
    word = re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b")
    for line in ('kind = "LORA"', "if w.kind == 'IA3':", "payload: LoraWeights", "x = BottleneckTables(args)"):
        assert word.search(line), line
    for line in ("max_lora_rank = 64", "MAX_LORA_RANK = 64", "LORA_DTYPES", "lora_dtype", "my_IA3_table"):
        assert not word.search(line), line
