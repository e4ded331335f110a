"""Where a decode step's time goes: one engine's pure decode steps of 32 sequences, split into their parts.

    .venv/bin/python -m bench.step_parts [--threads 2] [--nf4] [--steps 12] [--rounds 3] [--no-lora]
                                         [--torch-pointwise] [--json FILE]

Default model (fp32 dense, or NF4 with --nf4), 32 sequences of 32 prompt tokens, the base model and 32 distinct
rank-16 LoRAs on all seven projections (bench/kernels.py's engine setup), driven step by step from this thread
(bench/decode_step.py). The parts are timed by wrapping the functions that do them (wall clock, every call of a
timed step):

  step            Engine.step: scheduling, the runner, sampling, the token events
  batch build     ModelRunner.build: the step's flat layout, attention metadata, each adapter kind's step tables
  forward         LlamaModel.forward, and inside it: embed, rotary tables (cos/sin for the step's positions),
                  RMSNorm, the base matmuls of q/k/v, o, gate/up and down (each Projection's base layer), rotary
                  + KV write (q and k rotated, k and v written into the cache), attention
                  (kernels.attention.paged_attention), adapters (every StepAdapter hook: the LoRA kernels when they
                  run after the base matmuls), base + adapter in one call (StepAdapter.project_with_base: a group's
                  base matmuls and LoRA deltas together, kernels/projection.py; the matmul parts then exclude those
                  groups), LM head
  derived         host outside the runner = step - ModelRunner.run; other forward ops = forward - its timed parts
                  (residual adds, SiLU * up, views, the Python between them)

Wrapping costs a little (a few hundred timed calls per step): each variant also runs uninstrumented blocks,
interleaved with the instrumented ones, and the table gives both step medians. Each part's figure is the median
over the timed steps (so the parts need not add up to the step exactly); GFLOP/s for the matmuls count 2 * rows *
in * out per projection.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import sys
import time
import types
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from bench.decode_step import decode_block
from bench.workloads import random_lora

GROUPS = {"q_proj": "q/k/v matmul", "k_proj": "q/k/v matmul", "v_proj": "q/k/v matmul", "o_proj": "o matmul",
          "gate_proj": "gate/up matmul", "up_proj": "gate/up matmul", "down_proj": "down matmul"}
FUSED = "base + adapter in one call"
FORWARD_PARTS = ("embed", "rotary tables", "RMSNorm", *dict.fromkeys(GROUPS.values()), "rotary + KV write",
                 "attention", "adapters", FUSED, "LM head")
HOOKS = ("embed_tokens", "rope_factor", "norm", "embed", "project_input", "project_output", "project_outputs",
         "block_output")


class PartClock:
    """Wall seconds per part within one step; a part already running is not timed again when it nests."""

    def __init__(self) -> None:
        self.enabled = False
        self.current: dict[str, float] = defaultdict(float)
        self.steps: dict[str, list[dict[str, float]]] = defaultdict(list)  # variant -> each timed step's parts
        self.variant = ""
        self._running: set[str] = set()

    def wrap(self, part: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if not self.enabled or part in self._running:
                return fn(*args, **kwargs)
            self._running.add(part)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[part] += time.perf_counter() - t0
                self._running.discard(part)
        return timed

    def after_step(self, timed: bool) -> None:
        if timed and self.enabled:
            self.steps[self.variant].append(dict(self.current))
        self.current.clear()


@contextlib.contextmanager
def instrumented(engine, clock: PartClock) -> Iterator[None]:
    """Wrap the parts' functions (instances where the engine owns them, classes and modules otherwise)."""
    import dataclasses

    from server.model.batch import StepAdapter
    from server.model.layers import Projection, RMSNorm
    from server.model.llama import Attention

    undo: list[Callable[[], None]] = []

    def patch(owner, name: str, part: str) -> None:
        if isinstance(owner, type):  # a class: its own attribute, a staticmethod kept one
            raw = owner.__dict__[name]
            static = isinstance(raw, staticmethod)
            wrapped = clock.wrap(part, raw.__func__ if static else raw)
            setattr(owner, name, staticmethod(wrapped) if static else wrapped)
            undo.append(lambda: setattr(owner, name, raw))
        elif isinstance(owner, types.ModuleType):  # a module global, looked up at each call
            raw = getattr(owner, name)
            setattr(owner, name, clock.wrap(part, raw))
            undo.append(lambda: setattr(owner, name, raw))
        else:  # an instance: the wrapped bound method shadows the class's until deleted
            setattr(owner, name, clock.wrap(part, getattr(owner, name)))
            undo.append(lambda: delattr(owner, name))

    runner, model = engine.runner, engine.runner.model
    patch(engine, "step", "step")
    patch(runner, "run", "runner")
    patch(runner, "build", "batch build")
    patch(model, "forward", "forward")
    patch(model, "embed", "embed")
    patch(model.rotary, "cos_sin", "rotary tables")
    patch(RMSNorm, "forward", "RMSNorm")
    # the kernel backend the model's layers keep: a copy with the timed ops, handed to the modules that call them
    backend = model.kernels
    for module in [m for m in model.modules() if isinstance(m, Attention)]:
        module.kernels = dataclasses.replace(
            backend, rope_and_cache=clock.wrap("rotary + KV write", backend.rope_and_cache),
            paged_attention=clock.wrap("attention", backend.paged_attention))
        undo.append(lambda module=module: setattr(module, "kernels", backend))
    model.kernels = dataclasses.replace(backend, linear=clock.wrap("LM head", backend.linear))
    undo.append(lambda: setattr(model, "kernels", backend))
    for module in model.modules():
        if isinstance(module, Projection):
            patch(module.base, "forward", GROUPS[module.name])
    kinds = [StepAdapter]
    while kinds:
        cls = kinds.pop()
        kinds += cls.__subclasses__()
        for hook in HOOKS:
            if hook in cls.__dict__:
                patch(cls, hook, "adapters")
        if "project_with_base" in cls.__dict__:
            patch(cls, "project_with_base", FUSED)
    try:
        yield
    finally:
        for restore in reversed(undo):
            restore()


def matmul_flops(args, rows: int) -> dict[str, float]:
    """FLOPs per step of each timed matmul part for `rows` decode tokens."""
    flops: dict[str, float] = defaultdict(float)
    for module, part in GROUPS.items():
        n_in, n_out = args.projection_shape(module)
        flops[part] += 2.0 * rows * n_in * n_out * args.num_layers
    flops["LM head"] = 2.0 * rows * args.hidden_size * args.vocab_size
    return flops


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def measure(engine, variants: dict[str, list[str | None]], steps: int, rounds: int) -> dict[str, dict]:
    """Per variant: plain step wall ms (uninstrumented blocks) and each part's median ms over instrumented ones."""
    clock = PartClock()
    plain: dict[str, list[float]] = defaultdict(list)
    per_block = max(1, -(-steps // rounds))
    with instrumented(engine, clock):
        for name, adapters in variants.items():  # warm-up: slots filled, caches settled
            decode_block(engine, adapters, 4, f"warm-{name}")
        for r in range(rounds):
            for name, adapters in variants.items():
                clock.enabled = False
                wall, _ = decode_block(engine, adapters, per_block + 1, f"plain-{name}-{r}")
                plain[name] += wall
                clock.enabled, clock.variant = True, name
                decode_block(engine, adapters, per_block + 1, f"parts-{name}-{r}", clock.after_step)
                clock.enabled = False
    out = {}
    for name in variants:
        rows = clock.steps[name]
        table = {part: float(np.median([s.get(part, 0.0) for s in rows])) * 1e3
                 for part in ("step", "runner", "batch build", "forward", *FORWARD_PARTS)}
        table["host outside the runner"] = float(np.median([s["step"] - s["runner"] for s in rows])) * 1e3
        table["other forward ops"] = float(np.median(
            [s["forward"] - sum(s.get(p, 0.0) for p in FORWARD_PARTS) for s in rows])) * 1e3
        out[name] = {"plain_step_ms": float(np.median(plain[name])) * 1e3, "steps": len(rows), "parts_ms": table}
    return out


def report(results: dict[str, dict], args, rows: int) -> list[str]:
    names = list(results)
    flops = matmul_flops(args, rows)
    lines = ["| part | " + " | ".join(f"{n} ms | {n} %" for n in names) + " | GFLOP/s (first) |",
             "|---|" + "---:|---:|" * len(names) + "---:|"]
    order = ("step", "host outside the runner", "batch build", "forward", *FORWARD_PARTS, "other forward ops")
    for part in order:
        cells = []
        for n in names:
            ms, step = results[n]["parts_ms"][part], results[n]["parts_ms"]["step"]
            cells.append(f"{ms:.2f} | {100 * ms / step:.1f}")
        first = results[names[0]]["parts_ms"][part]
        rate = f"{flops[part] / (first * 1e-3) / 1e9:.0f}" if part in flops and first > 0 else ""
        lines.append(f"| {part} | " + " | ".join(cells) + f" | {rate} |")
    lines.append("| step, uninstrumented | " + " | ".join(
        f"{results[n]['plain_step_ms']:.2f} | {100 * results[n]['plain_step_ms'] / results[n]['parts_ms']['step']:.1f}"
        for n in names) + " | |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--nf4", action="store_true", help="the NF4 base (default: fp32 dense)")
    ap.add_argument("--steps", type=int, default=12, help="timed decode steps per variant and instrumentation")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved blocks the steps are split into")
    ap.add_argument("--no-lora", action="store_true", help="the base model only")
    ap.add_argument("--torch-pointwise", action="store_true",
                    help="RMSNorm and rotary through their torch references (kernels/pointwise.py), as before")
    ap.add_argument("--json", type=Path, default=None)
    cli = ap.parse_args(argv)
    if cli.threads:
        torch.set_num_threads(cli.threads)
    if cli.torch_pointwise:
        import kernels.pointwise

        kernels.pointwise._lib = lambda: None
    from server.config import AdapterPoolConfig, EngineConfig, ModelConfig
    from server.engine.engine import Engine

    engine = Engine.create(ModelConfig(quantize=cli.nf4), EngineConfig(),
                           AdapterPoolConfig(device_slots=32, max_lora_rank=64))
    variants: dict[str, list[str | None]] = {"base": [None] * 32}
    if not cli.no_lora:
        for i in range(32):
            engine.pool.register(f"a{i}", random_lora(engine.args, 16, i))
        variants["32 LoRA"] = [f"a{i}" for i in range(32)]
    mode = "NF4" if cli.nf4 else "fp32 dense"
    start = load_average()
    results = measure(engine, variants, cli.steps, cli.rounds)
    print(f"### Decode step parts ({dt.datetime.now():%Y-%m-%d %H:%M}, default model {mode}, 32 sequences, "
          f"{torch.get_num_threads()} threads, load average {start} -> {load_average()})\n")
    print(f"`python -m bench.step_parts {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    print("\n".join(report(results, engine.args, 32)))
    if cli.json:
        cli.json.write_text(json.dumps({"mode": mode, "threads": torch.get_num_threads(), "results": results},
                                       indent=2))


if __name__ == "__main__":
    main()
