"""Adapters changing under load, through a real server:
- hot swap: 16 concurrent clients send 208 requests while one adapter is re-uploaded 20 times and another
  is deleted and re-created; the only failures are NOT_FOUNDs the deletes explain, every response names
  its version, and its greedy tokens equal what that version's adapter produces alone;
- 1,000 registered adapters with 8 device slots: a load cycling through 200 of them all succeeds, with
  the step loop's longest pause printed (run with -s to see it).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from clients.errors import NotFound
from server.adapters.store import AdapterStore
from server.config import AdapterPoolConfig
from server.engine.request import GenerationRequest, SamplingParams
from tests.adapter_files import clone_store, peft_adapter
from tests.engine_utils import collect
from tests.server_utils import running_server

PROMPTS = [[11, 42, 97, 5], [300, 301, 7], [9, 8, 7, 6, 5, 4], [1234, 17]]
NEW_TOKENS = 6


def alone(engine, path: Path | None, prompt: list[int], tag: str) -> list[int]:
    """Greedy tokens of one request served by itself (the adapter registered under a private key)."""
    key = None
    if path is not None:
        key = f"ref/{tag}"
        if not engine.pool.known(key):
            engine.pool.register(key, path)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return collect(engine.submit(GenerationRequest(f"ref-{tag}-{prompt}", tuple(prompt), params, adapter=key))
                   ).token_ids


def test_hot_swap_under_load(tiny_llama_dir: Path) -> None:
    swap_seeds, flip_seeds = [51, 52, 53, 54], [61, 62]
    paths = {s: peft_adapter(tiny_llama_dir, seed=s) for s in swap_seeds + flip_seeds}
    with running_server(tiny_llama_dir, tenants=["acme"], pool_cfg=AdapterPoolConfig(device_slots=8,
                                                                                      max_lora_rank=8)) as srv:
        expected = {(seed, i): alone(srv.engine, paths[seed], p, str(seed)) for seed in paths
                    for i, p in enumerate(PROMPTS)}
        expected.update({(None, i): alone(srv.engine, None, p, "base") for i, p in enumerate(PROMPTS)})
        seed_of: dict[tuple[str, int], int] = {}  # (adapter, version) -> content seed
        with srv.client("acme") as admin:
            seed_of[("swap", admin.upload_adapter(paths[51], "swap").version)] = 51
            seed_of[("flip", admin.upload_adapter(paths[61], "flip").version)] = 61
        results: list[tuple[str, int, object]] = []
        lock = threading.Lock()
        load_running = threading.Event()

        def client_worker(worker: int) -> None:
            with srv.client("acme") as c:
                load_running.set()
                for j in range(13):
                    adapter = ["swap", "flip", "swap", ""][(worker + j) % 4]
                    prompt = (worker * 13 + j) % len(PROMPTS)
                    try:
                        out = c.generate(token_ids=PROMPTS[prompt], adapter=adapter, max_new_tokens=NEW_TOKENS,
                                         ignore_eos=True, timeout=120)
                    except Exception as exc:  # recorded and judged below
                        out = exc
                    with lock:
                        results.append((adapter, prompt, out))

        def swapper() -> None:
            load_running.wait()
            with srv.client("acme") as c:
                for k in range(20):
                    seed = swap_seeds[(k + 1) % len(swap_seeds)]
                    info = c.upload_adapter(paths[seed], "swap")
                    with lock:
                        seed_of[("swap", info.version)] = seed
                    time.sleep(0.05)

        def flipper() -> None:
            load_running.wait()
            with srv.client("acme") as c:
                for k in range(5):
                    time.sleep(0.1)
                    c.delete_adapter("flip")
                    time.sleep(0.1)  # requests in this window get NOT_FOUND
                    seed = flip_seeds[(k + 1) % 2]
                    info = c.upload_adapter(paths[seed], "flip")
                    with lock:
                        seed_of[("flip", info.version)] = seed

        with ThreadPoolExecutor(18) as pool:
            writers = [pool.submit(swapper), pool.submit(flipper)]
            clients = [pool.submit(client_worker, w) for w in range(16)]
            for f in writers + clients:
                f.result()

    assert len(results) == 208
    not_found = [r for r in results if isinstance(r[2], Exception)]
    assert all(isinstance(out, NotFound) and adapter == "flip" for adapter, _, out in not_found), not_found[:3]
    versions_seen = set()
    for adapter, prompt, out in results:
        if isinstance(out, Exception):
            continue
        if adapter:
            assert out.adapter_name == f"acme/{adapter}" and out.adapter_version > 0
            seed = seed_of[(adapter, out.adapter_version)]
            versions_seen.add((adapter, out.adapter_version))
        else:
            seed = None
        assert out.token_ids == expected[(seed, prompt)], (adapter, out.adapter_version, prompt)
    swap_versions = {v for a, v in versions_seen if a == "swap"}
    print(f"\nhot swap: {len(results)} requests, {len(not_found)} NOT_FOUND (flip deleted), "
          f"{len(swap_versions)} swap versions and {len(versions_seen) - len(swap_versions)} flip versions served")
    assert len(swap_versions) >= 3, "the re-uploads did not overlap the load"


@pytest.mark.timeout(600)
def test_a_thousand_adapters_eight_slots(tiny_llama_dir: Path, tmp_path: Path) -> None:
    contents = 10
    data = tmp_path / "data"
    store = AdapterStore(data / "adapters")
    paths = [peft_adapter(tiny_llama_dir, seed=70 + i) for i in range(contents)]
    for i, path in enumerate(paths):
        store.put("acme", f"a{i:04d}", path, meta={"kind": "LORA", "rank": 4, "target_modules": ["q_proj", "v_proj"]})
    clone_store(store, "acme", 1000, contents)
    with running_server(tiny_llama_dir, tenants=["acme"], data_dir=data,
                        pool_cfg=AdapterPoolConfig(device_slots=8, max_lora_rank=8)) as srv:
        prompt = PROMPTS[0]
        expected = [alone(srv.engine, p, prompt, f"c{i}") for i, p in enumerate(paths)]
        with srv.client("acme") as c:
            listed = c.list_adapters()
        assert len(listed) == 1000 and {a.residency for a in listed if a.name >= "a0010"} == {"disk"}
        engine = srv.engine
        steps: list[tuple[float, float, int]] = []  # (start, end, sequences still running after it)
        plain_step = engine.step

        def timed_step() -> None:
            start = time.monotonic()
            plain_step()
            steps.append((start, time.monotonic(), len(engine.scheduler.running)))

        engine.step = timed_step  # the loop calls self.step(): this instance attribute wraps it
        before = srv.engine.pool.stats()
        failures: list[object] = []
        wrong: list[str] = []

        def worker(w: int) -> None:
            with srv.client("acme") as c:
                for j in range(w, 400, 16):
                    name = f"a{j % 200:04d}"
                    try:
                        out = c.generate(token_ids=prompt, adapter=name, max_new_tokens=4, ignore_eos=True,
                                         timeout=300)
                    except Exception as exc:
                        failures.append(exc)
                        continue
                    if out.token_ids != expected[(j % 200) % contents][:4]:
                        wrong.append(name)

        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(worker, range(16)))
        elapsed = time.monotonic() - started
        engine.step = plain_step
        stats = srv.engine.pool.stats()
        engine_longest = srv.engine.stats().longest_step_s
    longest_step = max(end - start for start, end, _ in steps)
    # a pause: sequences were running after one step, and the next step started only this much later
    pauses = sorted(nxt[0] - prev[1] for prev, nxt in zip(steps, steps[1:], strict=False) if prev[2] > 0)
    busy = [s for s in steps if s[2] > 0]
    print(f"\n1000 adapters / 8 slots / 200 cycled: 400 requests in {elapsed:.1f} s; {len(busy)} decoding steps; "
          f"longest step {longest_step * 1e3:.1f} ms (engine stats: {engine_longest * 1e3:.1f} ms since start); "
          f"longest pause between steps with sequences running "
          f"{pauses[-1] * 1e3:.2f} ms (p99 {pauses[int(len(pauses) * 0.99)] * 1e3:.2f} ms); "
          f"slot fills {stats.loads - before.loads}, disk loads {stats.disk_loads - before.disk_loads}, "
          f"longest slot copy (loader thread) {stats.max_slot_copy_s * 1e3:.2f} ms")
    assert engine_longest >= longest_step * 0.5  # the engine's own figure sees the same steps
    assert not failures, failures[:3]
    assert not wrong, wrong[:5]
    assert stats.loads - before.loads >= 200 and stats.disk_loads - before.disk_loads >= 190
