"""The adapter pool's three tiers: host LRU by bytes, fixed device slots (only unpinned adapters evicted),
loading on the pool's loader thread so the step loop keeps decoding while an adapter loads."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from server.adapters.peft_format import read_adapter
from server.adapters.pool import AdapterLoadError, AdapterPool
from server.config import AdapterLimits, AdapterPoolConfig, EngineConfig, ModelConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams
from server.model.args import ModelArgs
from tests.adapter_files import peft_adapter
from tests.engine_utils import collect


def wait_for(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def loras(tiny_llama_dir: Path) -> list[Path]:
    return [peft_adapter(tiny_llama_dir, seed=40 + i) for i in range(3)]


def acquire_soon(pool: AdapterPool, key: str):
    """acquire() as the step loop does it: retried until the loader has the adapter in a slot."""
    leases = []
    wait_for(lambda: leases.append(pool.acquire(key)) or leases[-1] is not None)
    return leases[-1]


def make_pool(base_dir: Path, **cfg) -> AdapterPool:
    args = ModelArgs.from_dir(base_dir)
    return AdapterPool(AdapterPoolConfig(max_lora_rank=8, **cfg), args, torch.float32, "cpu",
                       reader=lambda p: read_adapter(p, args, AdapterLimits(8, 16)))


def test_device_slots_evict_only_unpinned_lru(tiny_llama_dir: Path, loras: list[Path]) -> None:
    pool = make_pool(tiny_llama_dir, device_slots=2)
    for i, path in enumerate(loras):
        pool.register(f"k{i}", path)
        assert pool.residency(f"k{i}") == "disk"
    assert pool.acquire("k0") is None  # not on the host yet: the loader reads it and fills a slot; the caller waits
    lease0 = acquire_soon(pool, "k0")
    pool.host_weights("k1")  # a blocking read on this thread also works
    lease1 = acquire_soon(pool, "k1")
    assert {lease0.adapter_slot, lease1.adapter_slot} == {0, 1} and pool.residency("k0") == "device"
    pool.host_weights("k2")
    for _ in range(20):  # both slots pinned by running sequences: k2 waits
        assert pool.acquire("k2") is None
        time.sleep(0.005)
    pool.release("k0")
    lease2 = acquire_soon(pool, "k2")  # k0 was the least recently used unpinned one
    assert lease2.adapter_slot == lease0.adapter_slot
    assert pool.residency("k0") == "host" and pool.residency("k1") == "device"
    table = pool.tables.by_kind["LORA"].a["q_proj"]
    torch.testing.assert_close(table[lease2.adapter_slot, 0, :4], lease2.weights.payload.a[(0, "q_proj")])
    pool.close()


def test_host_cache_is_bounded_by_bytes(tiny_llama_dir: Path, loras: list[Path]) -> None:
    one = make_pool(tiny_llama_dir)
    one.register("x", loras[0])
    size = one.host_weights("x").nbytes()
    pool = make_pool(tiny_llama_dir, device_slots=1, host_cache_bytes=int(size * 2.5))
    for i, path in enumerate(loras):
        pool.register(f"k{i}", path)
    pool.reserve("k0")  # a submitted request wants k0: never dropped while it waits
    wait_for(lambda: pool.residency("k0") == "device")  # the loader read it and, wanted, put it in the slot
    pool.host_weights("k1")
    pool.host_weights("k2")
    stats = pool.stats()
    assert stats.host_bytes <= 2.5 * size and stats.host_entries == 2
    assert [pool.residency(f"k{i}") for i in range(3)] == ["device", "disk", "host"]
    pool.unreserve("k0")
    pool.close()


def test_a_failed_load_fails_its_requests_only(tiny_llama_dir: Path, loras: list[Path]) -> None:
    engine = Engine.create(ModelConfig(path=str(tiny_llama_dir), quantize=False), EngineConfig(),
                           AdapterPoolConfig(device_slots=2, max_lora_rank=8))
    good = read_adapter(loras[0], engine.args, AdapterLimits(8, 16))

    def broken():
        raise ValueError("sha256 mismatch on disk")

    engine.pool.register("good", loras[0])
    engine.pool.register("broken", broken, meta=engine.pool.meta("good"))
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=5, ignore_eos=True)
        bad = collect(engine.submit(GenerationRequest("bad", (1, 2, 3), params, adapter="broken")))
        ok = collect(engine.submit(GenerationRequest("ok", (1, 2, 3), params, adapter="good")))
        assert bad.error is not None and "sha256 mismatch" in bad.error and len(ok.token_ids) == 5
        with pytest.raises(AdapterLoadError):
            engine.pool.acquire("broken")
    finally:
        engine.shutdown()
    assert good.payload.rank == 4


def test_step_loop_keeps_decoding_while_an_adapter_loads(tiny_llama_dir: Path, loras: list[Path]) -> None:
    """A slow disk (1 s per load) stalls only the request that needs that adapter."""
    engine = Engine.create(ModelConfig(path=str(tiny_llama_dir), quantize=False), EngineConfig(),
                           AdapterPoolConfig(device_slots=2, max_lora_rank=8))
    slow_started = threading.Event()
    load_window: list[float] = []

    def slow_read():
        load_window.append(time.monotonic())
        slow_started.set()
        time.sleep(1.0)
        load_window.append(time.monotonic())
        return read_adapter(loras[1], engine.args, AdapterLimits(8, 16))

    engine.pool.register("fast", loras[0])
    engine.pool.register("slow", slow_read, meta=engine.pool.meta("fast"))
    steps: list[float] = []
    engine.on_logits = lambda seqs, logits: steps.append(time.monotonic())
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=400, ignore_eos=True)  # outlasts the 1 s load
        long = engine.submit(GenerationRequest("long", (1, 2, 3), params, adapter="fast"))
        long.get(timeout=30)
        waiting = engine.submit(GenerationRequest("slow", (4, 5, 6), SamplingParams(max_new_tokens=4, ignore_eos=True),
                                                  adapter="slow"))
        assert slow_started.wait(5)
        slow_result = collect(waiting)
        collect(long)
        start, end = load_window
        during = [t for t in steps if start <= t <= end]
        gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
        assert len(slow_result.token_ids) == 4
        assert len(during) >= 5, f"only {len(during)} steps ran while the adapter loaded"
        assert max(gaps) < 0.5, f"the step loop paused {max(gaps):.3f} s while the adapter loaded"
        # the same request once the adapter is resident gives the same tokens
        again = collect(engine.submit(GenerationRequest("again", (4, 5, 6), SamplingParams(max_new_tokens=4,
                                                                                           ignore_eos=True),
                                                        adapter="slow")))
        assert again.token_ids == slow_result.token_ids
    finally:
        engine.shutdown()


def test_revive_registers_again_a_key_unregistered_while_in_use(tiny_llama_dir: Path, loras: list[Path]) -> None:
    from server.adapters.pool import UnknownAdapter

    pool = make_pool(tiny_llama_dir, device_slots=2)
    assert not pool.revive("k0")  # never registered: the caller registers it
    pool.register("k0", loras[0])
    pool.reserve("k0")  # a submitted sequence holds it
    pool.unregister("k0")
    assert not pool.known("k0")
    with pytest.raises(ValueError, match="in use"):
        pool.register("k0", loras[0])  # what a replica's reload hit before revive
    assert pool.revive("k0") and pool.known("k0")
    pool.unreserve("k0")  # the last user ends: a revived key stays
    assert pool.known("k0")
    pool.unregister("k0")  # idle: dropped at once
    assert not pool.revive("k0")
    with pytest.raises(UnknownAdapter):
        pool.reserve("k0")
    pool.close()
