"""Timing pure decode steps of one engine, driven from the caller's thread (the engine thread is not started).

Shared by bench/kernels.py (base vs 32 LoRAs) and bench/kinds.py (base vs 32 adapters of each kind), so both
measure the same way: an untimed warm-up block per variant (adapters loaded into their slots, allocator and caches
settled, the first decode steps run), then `rounds` blocks of each variant interleaved (base, kind, base, kind, ...)
so that a change of load on shared cores lands on both; each block submits one sequence per entry of its adapter list
(32-token prompts), and only steps that ran every sequence as one decode token are timed. Reported per variant: the
median wall and CPU milliseconds over all timed steps of all its blocks.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

PROMPT = tuple(range(100, 132))  # 32 prompt tokens per sequence


@dataclass(frozen=True, slots=True)
class StepTimes:
    wall_ms: float  # median over the timed steps
    cpu_ms: float
    steps: int  # timed steps


def decode_block(engine, adapters: list[str | None], new_tokens: int, label: str,
                 after_step: Callable[[bool], None] | None = None) -> tuple[list[float], list[float]]:
    """One sequence per adapter (None = base), `new_tokens` each; (wall s, CPU s) of every pure-decode step.
    after_step(timed): called after each step, with whether it was one of the timed ones."""
    from server.engine.request import GenerationRequest, SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    handles = [engine.submit(GenerationRequest(f"{label}-{i}", PROMPT, params, adapter=a))
               for i, a in enumerate(adapters)]
    wall: list[float] = []
    cpu: list[float] = []
    while any(not h.done for h in handles):
        engine.take_submitted()
        steps_before = engine.steps
        w0, c0 = time.perf_counter(), time.process_time()
        engine.step()
        w, c = time.perf_counter() - w0, time.process_time() - c0
        stats = engine.stats()  # a step with nothing schedulable (adapters still loading) runs no batch
        timed = (engine.steps > steps_before and stats.batch_size == len(adapters)
                 and stats.batch_tokens == len(adapters))
        if timed:
            wall.append(w)
            cpu.append(c)
        if after_step is not None:
            after_step(timed)
        for h in handles:  # consume events so `done` is seen
            with contextlib.suppress(queue.Empty):
                while not h.done:
                    h.get(timeout=0)
    return wall, cpu


def interleaved(engine, variants: dict[str, list[str | None]], steps: int, rounds: int = 3,
                warmup_tokens: int = 4,
                contexts: dict[str, Callable[[], contextlib.AbstractContextManager]] | None = None
                ) -> dict[str, StepTimes]:
    """Median decode-step times of each variant: a warm-up block each, then `rounds` interleaved blocks each of
    `steps` decode steps (split as evenly as rounds allow). contexts[name](): entered around each of that variant's
    blocks (e.g. a code path switched off)."""
    contexts = contexts or {}

    def block(name: str, adapters: list[str | None], tokens: int, label: str) -> tuple[list[float], list[float]]:
        with contexts.get(name, contextlib.nullcontext)():
            return decode_block(engine, adapters, tokens, label)

    for name, adapters in variants.items():
        block(name, adapters, warmup_tokens, f"warm-{name}")
    per_block = max(1, -(-steps // rounds))
    walls: dict[str, list[float]] = {name: [] for name in variants}
    cpus: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, adapters in variants.items():
            w, c = block(name, adapters, per_block + 1, f"{name}-{r}")  # +1: the prefill's token
            walls[name] += w
            cpus[name] += c
    return {name: StepTimes(float(np.median(walls[name])) * 1e3 if walls[name] else float("nan"),
                            float(np.median(cpus[name])) * 1e3 if cpus[name] else float("nan"), len(walls[name]))
            for name in variants}
