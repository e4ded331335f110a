"""Fair scheduling across tenants (server.engine.fairness): the VTC bound, FCFS's growing gap, weights.

The engine is driven step by step (bench.fair_drive): arrivals are counted in engine steps, so every run
is deterministic and the bound is checked on exact service counts, not on wall-clock timing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.fair_drive import Shape, TenantLoad, drive, vtc_bound
from server.config import EngineConfig, ModelConfig
from server.engine.engine import Engine
from server.engine.fairness import WaitingQueue
from server.engine.request import GenerationRequest, RequestHandle
from server.engine.sequence import Sequence

SHAPE = Shape(prompt_len=(4, 24), new_tokens=(4, 16))
MAX_RUNNING = 4


def make_engine(model_dir: Path, scheduling: str) -> Engine:
    cfg = EngineConfig(scheduling=scheduling, max_running=MAX_RUNNING, max_waiting=100_000, max_batch_tokens=256)
    return Engine.create(ModelConfig(path=str(model_dir), quantize=False), cfg)


@pytest.fixture(scope="module")
def engines(tiny_llama_dir: Path) -> dict[str, Engine]:
    return {policy: make_engine(tiny_llama_dir, policy) for policy in ("fcfs", "vtc")}


def test_vtc_bounds_the_service_gap_and_fcfs_does_not(engines) -> None:
    """Two backlogged tenants, same request shapes, one sending 10x the other (both above capacity: about
    0.3 requests per step fit): under VTC the service gap stays within the bound at every step; under FCFS
    it grows far past it."""
    seed = 1234
    loads = [TenantLoad("light", rate=0.5), TenantLoad("heavy", rate=5.0)]
    steps = 300
    cfg = engines["vtc"].config
    bound = vtc_bound(cfg.w_in, cfg.w_out, SHAPE, MAX_RUNNING)
    gaps = {}
    for policy, engine in engines.items():
        trace = drive(engine, loads, steps, seed=seed, shape=SHAPE)
        light, heavy = trace.service_of("light"), trace.service_of("heavy")
        assert sum(1 for r in trace.requests if r.tenant == "light" and r.first_token_step is None) > 0, (
            f"{policy}: the light tenant was not backlogged (seed {seed})")
        gaps[policy] = np.abs(heavy - light)
    worst_vtc = float(gaps["vtc"].max())
    assert worst_vtc <= bound, f"VTC service gap {worst_vtc} exceeds the bound {bound} (seed {seed})"
    # FCFS serves in arrival order: the heavy tenant gets ~10/11 of the service, so the gap grows with time
    fcfs = gaps["fcfs"]
    assert fcfs[-1] > 5 * bound, f"FCFS gap {fcfs[-1]} should grow far past {bound} (seed {seed})"
    assert fcfs[-1] > 2 * fcfs[steps // 3], f"FCFS gap should keep growing: {fcfs[steps // 3]} -> {fcfs[-1]}"


def test_weights_two_to_one_give_service_two_to_one(engines) -> None:
    seed = 99
    engine = engines["vtc"]
    loads = [TenantLoad("gold", rate=2.0, weight=2.0), TenantLoad("bronze", rate=2.0, weight=1.0)]
    trace = drive(engine, loads, 500, seed=seed, shape=SHAPE)
    gold, bronze = trace.service_of("gold")[-1], trace.service_of("bronze")[-1]
    assert gold / bronze == pytest.approx(2.0, rel=0.10), f"service {gold} : {bronze} (seed {seed})"


def test_a_tenant_arriving_late_gets_no_banked_credit(engines) -> None:
    """The counter lift: a tenant that was idle while another was served starts level with it, so it does not
    monopolise the engine to 'catch up' (its service then tracks the other's from the moment it arrived)."""
    seed = 7
    engine = engines["vtc"]
    loads = [TenantLoad("early", rate=2.0), TenantLoad("late", rate=2.0, start_step=150)]
    trace = drive(engine, loads, 350, seed=seed, shape=SHAPE)
    early, late = trace.service_of("early"), trace.service_of("late")
    bound = vtc_bound(1.0, 2.0, SHAPE, MAX_RUNNING)
    gained_early, gained_late = early[-1] - early[150], late[-1] - late[150]
    assert abs(gained_early - gained_late) <= bound, f"{gained_early} vs {gained_late} (seed {seed})"


# ---- the queue on its own ---------------------------------------------------------------------------
def _seq(tenant: str, i: int, prompt: int = 4) -> Sequence:
    req = GenerationRequest(f"{tenant}-{i}", tuple(range(1, prompt + 1)), tenant=tenant, arrival_time=float(i))
    return Sequence(request=req, handle=RequestHandle(req.request_id), detok=None)


def test_vtc_queue_order_lift_and_bookkeeping() -> None:
    q = WaitingQueue("vtc", w_in=1.0, w_out=2.0)
    a = [_seq("a", i) for i in range(3)]
    b = [_seq("b", 10 + i) for i in range(2)]
    for s in a:
        q.push(s)
    assert len(q) == 3 and a[1] in q and b[0] not in q
    first = q.pop_next()
    assert first is a[0]
    q.on_admit(first, 4)  # a's counter 4
    q.push(b[0])  # b becomes backlogged: lifted to min(backlogged) = a's counter
    assert q.counters["b"] == 4.0
    q.push(b[1])
    q.on_tokens(first, 1)  # a: 6 > b: 4 -> b's head next, FIFO within b
    assert q.pop_next() is b[0]
    q.push_front(b[0])  # not admitted now: back to the front of b, no lift, no charge
    assert q.counters["b"] == 4.0 and q.pop_next() is b[0]
    q.remove(a[2])
    assert a[2] not in q and len(q) == 2 and [s.request_id for s in q] == ["a-1", "b-11"]
    with pytest.raises(ValueError):
        q.remove(a[2])
    assert q.most_ahead_tenant(["a", "b"]) == "a"
    assert q.preemption_victim([a[0], b[0], a[1]]) is a[1]  # newest of the tenant most ahead
    snap = q.snapshot()
    assert snap["a"].service == 6.0 and snap["a"].prompt_tokens == 4 and snap["a"].generated_tokens == 1


def test_weights_divide_the_counter_and_fcfs_keeps_arrival_order() -> None:
    q = WaitingQueue("vtc", weights={"a": 2.0})
    s = _seq("a", 0)
    q.on_admit(s, 10)
    assert q.counters["a"] == 5.0 and q.service["a"] == 10.0
    f = WaitingQueue("fcfs")
    seqs = [_seq(t, i) for i, t in enumerate("abab")]
    for x in seqs[:3]:
        f.push(x)
    f.push_front(seqs[3])  # FCFS deque semantics: explicitly to the front
    assert [f.pop_next() for _ in range(5)] == [seqs[3], *seqs[:3], None]
    assert f.preemption_victim(seqs) is seqs[-1]
    with pytest.raises(ValueError):
        WaitingQueue("lottery")


def test_vtc_preempts_from_the_tenant_most_ahead_and_outputs_are_unchanged(tiny_llama_dir: Path) -> None:
    """A KV budget too small for every running sequence: each victim is the newest candidate of the candidate
    tenant with the largest counter, and every request still completes with exactly its tokens."""
    cfg = EngineConfig(scheduling="vtc", max_batch_tokens=64, kv_blocks=12, kv_block_size=8, max_waiting=1000)
    engine = Engine.create(ModelConfig(path=str(tiny_llama_dir), quantize=False), cfg)
    waiting = engine.scheduler.waiting
    choices: list[tuple[list[Sequence], dict[str, float], Sequence | None]] = []
    original = waiting.preemption_victim

    def victim(candidates: list[Sequence]) -> Sequence | None:
        chosen = original(candidates)
        choices.append((list(candidates), dict(waiting.counters), chosen))
        return chosen

    waiting.preemption_victim = victim
    loads = [TenantLoad("a", rate=0.5), TenantLoad("b", rate=0.25)]
    trace = drive(engine, loads, 250, seed=5, shape=Shape(prompt_len=(10, 30), new_tokens=(16, 24)))
    assert engine.scheduler.preemptions > 0, "the KV budget should force preemptions"
    for candidates, counters, chosen in choices:
        if not candidates:
            assert chosen is None
            continue
        top = max(counters.get(s.request.tenant, 0.0) for s in candidates)
        newest_of_top = [s for s in candidates if counters.get(s.request.tenant, 0.0) == top][-1]
        assert chosen is newest_of_top, (counters, [s.request_id for s in candidates], chosen.request_id)
    assert {c[2].request.tenant for c in choices if c[2] is not None} == {"a", "b"}  # not always the same one
    done = [r for r in trace.requests if r.finish_step is not None]
    assert done and all(r.completion_tokens == r.max_new_tokens for r in done)
