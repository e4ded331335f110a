"""bench/step_parts.py on the tiny model: every part of a decode step is timed, the adapters' parts only where the
step has adapters (its LoRA groups' base matmuls inside the one-call part), and the wrapped functions are restored
afterwards."""

from __future__ import annotations

from pathlib import Path

from bench.step_parts import FORWARD_PARTS, FUSED, GROUPS, measure, report
from bench.workloads import random_lora
from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
from server.engine.engine import Engine
from server.model.layers import RMSNorm


def test_step_parts_split_a_decode_step(tiny_llama_dir: Path) -> None:
    engine = Engine.create(ModelConfig(path=str(tiny_llama_dir), quantize=False), EngineConfig(),
                           AdapterPoolConfig(device_slots=4, max_lora_rank=16))
    for i in range(4):
        engine.pool.register(f"a{i}", random_lora(engine.args, 4, i))
    norm_forward = RMSNorm.forward
    results = measure(engine, {"base": [None] * 4, "lora": [f"a{i}" for i in range(4)]}, steps=4, rounds=2)
    for name, result in results.items():
        parts = result["parts_ms"]
        assert result["steps"] >= 4 and result["plain_step_ms"] > 0, name
        assert parts["step"] >= parts["runner"] >= parts["forward"] > 0, (name, parts)
        for part in ("RMSNorm", "rotary + KV write", "attention", "LM head"):
            assert parts[part] > 0, (name, part)
        assert sum(parts[p] for p in FORWARD_PARTS) <= parts["forward"] * 1.25, (name, parts)  # medians: roughly
    base, lora = results["base"]["parts_ms"], results["lora"]["parts_ms"]
    assert all(base[part] > 0 for part in dict.fromkeys(GROUPS.values())), base
    assert base["adapters"] == 0 == base[FUSED] < lora["adapters"], (base, lora)
    assert lora[FUSED] > 0, "the LoRA groups' base matmuls and deltas in one call (kernels/projection.py)"
    assert "step" not in vars(engine) and "forward" not in vars(engine.runner.model), "instance wrappers removed"
    assert RMSNorm.forward is norm_forward, "class wrappers restored"
    lines = report(results, engine.args, 4)
    assert len(lines) == 2 + len(FORWARD_PARTS) + 5 + 1 and all(line.count("|") == 7 for line in lines[2:])
