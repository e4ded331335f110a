"""Drive an Engine step by step with several tenants' arrivals: deterministic, counted in engine steps.

Used by the fairness tests (tests/test_fairness.py) and bench/fairness.py, so what is tested is what is
measured. No step-loop thread: arrivals are submitted between steps, `Engine.take_submitted()` then
`Engine.step()` run on the caller's thread, and every request's first-token step is recorded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from queue import Empty

import numpy as np

from server.engine.request import GenerationRequest, SamplingParams


@dataclass(frozen=True, slots=True)
class TenantLoad:
    name: str
    rate: float  # requests per engine step (deterministic: a fractional accumulator, no randomness)
    weight: float = 1.0
    start_step: int = 0  # first step with arrivals
    stop_step: int | None = None  # no arrivals from this step on (None = until the end)


@dataclass(frozen=True, slots=True)
class Shape:
    prompt_len: tuple[int, int] = (4, 24)  # inclusive range, drawn per request
    new_tokens: tuple[int, int] = (4, 16)  # max_new_tokens range (EOS ignored: exactly this many)


@dataclass
class RequestTrace:
    tenant: str
    arrival_step: int
    arrival_s: float
    prompt_tokens: int
    max_new_tokens: int
    first_token_step: int | None = None
    first_token_s: float | None = None
    finish_step: int | None = None
    completion_tokens: int = 0
    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)  # what it generated


@dataclass
class Trace:
    tenants: list[str]
    service: list[dict[str, float]] = field(default_factory=list)  # per step: tenant -> service in this run
    requests: list[RequestTrace] = field(default_factory=list)
    steps: int = 0
    wall_s: float = 0.0

    def service_of(self, tenant: str) -> np.ndarray:  # [steps]
        return np.array([s.get(tenant, 0.0) for s in self.service])

    def ttft_steps(self, tenant: str) -> list[int]:
        """Engine steps from arrival to the first token, counting the step that produced it (1 = no wait)."""
        return [r.first_token_step - r.arrival_step + 1 for r in self.requests
                if r.tenant == tenant and r.first_token_step is not None]

    def ttft_s(self, tenant: str) -> list[float]:
        return [r.first_token_s - r.arrival_s for r in self.requests
                if r.tenant == tenant and r.first_token_s is not None]


def drive(engine, loads: list[TenantLoad], steps: int, seed: int = 0, shape: Shape | None = None) -> Trace:
    """Run `steps` engine steps with the tenants' arrivals; `engine` must not have its loop thread started."""
    shape = shape or Shape()
    rng = np.random.default_rng(seed)
    waiting = engine.scheduler.waiting
    waiting.set_weights({load.name: load.weight for load in loads})
    trace = Trace([load.name for load in loads])
    before = {t: s.service for t, s in waiting.snapshot().items()}  # service is counted from this run's start
    owed = {load.name: 0.0 for load in loads}
    live: dict[str, tuple] = {}  # request_id -> (handle, RequestTrace)
    started = time.perf_counter()
    n = 0
    for step in range(steps):
        for load in loads:
            if step < load.start_step or (load.stop_step is not None and step >= load.stop_step):
                continue
            owed[load.name] += load.rate
            while owed[load.name] >= 1.0:
                owed[load.name] -= 1.0
                p = int(rng.integers(shape.prompt_len[0], shape.prompt_len[1] + 1))
                m = int(rng.integers(shape.new_tokens[0], shape.new_tokens[1] + 1))
                ids = tuple(int(t) for t in rng.integers(10, 1000, size=p))
                rid = f"{load.name}-{n}"
                n += 1
                handle = engine.submit(GenerationRequest(rid, ids, SamplingParams(max_new_tokens=m, ignore_eos=True),
                                                         tenant=load.name))
                rec = RequestTrace(load.name, step, time.perf_counter(), p, m, request_id=rid)
                trace.requests.append(rec)
                live[rid] = (handle, rec)
        engine.take_submitted()
        engine.step()
        now = time.perf_counter()
        for rid, (handle, rec) in list(live.items()):
            while True:
                try:
                    event = handle.get(timeout=0)
                except Empty:
                    break
                if event.token_ids and rec.first_token_step is None:
                    rec.first_token_step, rec.first_token_s = step, now
                rec.completion_tokens += len(event.token_ids)
                rec.token_ids.extend(event.token_ids)
                if event.finished:
                    rec.finish_step = step
                    del live[rid]
                    break
        trace.service.append({t: s.service - before.get(t, 0.0) for t, s in waiting.snapshot().items()})
    trace.steps = steps
    trace.wall_s = time.perf_counter() - started
    for rid in live:  # leave the engine empty for the next run
        engine.abort(rid)
    engine.take_submitted()
    return trace


def vtc_bound(w_in: float, w_out: float, shape: Shape, max_running: int) -> float:
    """Sheng et al.'s bound on the service difference of two backlogged tenants,
    2 * max(w_in * max prompt, w_out * max_new_tokens), plus one step's worth of service for the
    engine's granularity: every running sequence's decode token and every admitted prompt of one step."""
    one_step = max_running * (w_in * shape.prompt_len[1] + w_out)
    return 2 * max(w_in * shape.prompt_len[1], w_out * shape.new_tokens[1]) + one_step
