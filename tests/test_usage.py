"""Usage accounting (server/usage.py): per tenant, adapter and minute in SQLite, surviving SIGKILL.

The oracle is the `usage` field of every response the clients received: after 200 mixed requests (two
tenants, unary and streaming, base model and an adapter, different lengths) and a SIGKILL, the restarted
server's totals lie between the usage of the responses finished a second before the kill (the flusher
writes every 0.5 s: at most the last second is lost) and the sum of all of them; once a flush had time to
run before the kill they are equal. SIGHUP on the way: a broken tenants file is refused, a good one rotates a key.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from clients import SwitchboardClient
from clients.errors import PermissionDenied, Unauthenticated
from server.tenants import hash_key, new_key
from server.usage import UsageRecorder
from tests.adapter_files import peft_adapter
from tests.server_utils import wait_until
from tests.test_admin_crash import start_server


def test_recorder_buckets_by_minute_queries_ranges_and_persists(tmp_path: Path) -> None:
    db = tmp_path / "usage.sqlite"
    rec = UsageRecorder(db, flush_interval_s=60)  # flushes only when asked
    rec.record("a", "", 3, 4, at=120.5)
    rec.record("a", "", 1, 1, at=179.9)  # same minute [120, 180)
    rec.record("a", "a/x", 2, 2, at=180.0)
    rec.record("b", "", 5, 5, at=61)
    rows = rec.query("a")
    assert [(r.adapter, r.minute, r.prompt_tokens, r.completion_tokens, r.requests) for r in rows] == [
        ("", 120, 4, 5, 2), ("a/x", 180, 2, 2, 1)]
    assert [r.tenant for r in rec.query(None, 0, 120)] == ["b"]  # [start, end)
    assert [r.minute for r in rec.query(None, 150)] == [120, 180]  # start inside a minute includes it
    rec.record("a", "", 1, 0, at=130)
    rec.close()  # a clean close flushes
    again = UsageRecorder(db)
    assert again.query("a", 120, 180)[0].requests == 3
    again.close()


def _tenants_file(path: Path, keys: dict[str, str]) -> Path:
    path.write_text("".join(f'[tenants.{n}]\nkey_sha256 = "{hash_key(k)}"\n\n' for n, k in keys.items()))
    return path


def _start(model_dir: Path, data_dir: Path, tenants: Path):
    return start_server(model_dir, data_dir, "--tenants", str(tenants))


def _works(target: str, key: str) -> bool:
    with SwitchboardClient(target, api_key=key) as c:
        try:
            c.list_adapters()
            return True
        except Unauthenticated:
            return False


def _totals(target: str, admin_key: str) -> Counter:
    with SwitchboardClient(target, api_key=admin_key) as admin:
        report = admin.get_usage()
    out = Counter()
    for r in report.rows:
        out[(r.tenant, r.adapter, "prompt")] += r.prompt_tokens
        out[(r.tenant, r.adapter, "completion")] += r.completion_tokens
        out[(r.tenant, r.adapter, "requests")] += r.requests
    return out


@pytest.mark.timeout(400)
def test_usage_survives_sigkill_and_equals_the_responses(tiny_llama_dir: Path, tmp_path: Path) -> None:
    seed = 2026
    rng = random.Random(seed)
    keys = {"admin": new_key(), "acme": new_key(), "bob": new_key()}
    tenants = _tenants_file(tmp_path / "tenants.toml", keys)
    data = tmp_path / "data"
    proc, target = _start(tiny_llama_dir, data, tenants)
    sent: list[tuple[float, tuple, int, int]] = []  # (finished at, (tenant, adapter), prompt, completion)
    lock = threading.Lock()
    try:
        with SwitchboardClient(target, api_key=keys["acme"]) as acme:
            acme.upload_adapter(peft_adapter(tiny_llama_dir), "style")
        jobs = [(rng.choice(["acme", "bob"]), rng.random() < 0.5, rng.random() < 0.3, rng.randint(2, 30),
                 rng.randint(1, 12)) for _ in range(200)]

        def one(job) -> None:
            tenant, streaming, adapted, n_prompt, n_new = job
            adapter = "style" if adapted and tenant == "acme" else ""
            ids = [rng.randint(10, 999) for _ in range(n_prompt)]
            with SwitchboardClient(target, api_key=keys[tenant]) as c:
                if streaming:
                    last = list(c.stream(token_ids=ids, adapter=adapter, max_new_tokens=n_new))[-1]
                    p, g = last.prompt_tokens, last.completion_tokens
                else:
                    r = c.generate(token_ids=ids, adapter=adapter, max_new_tokens=n_new)
                    p, g = r.prompt_tokens, r.completion_tokens
            with lock:
                sent.append((time.time(), (tenant, "acme/style" if adapter else ""), p, g))

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, jobs))
        killed_at = time.time()
        os.kill(proc.pid, signal.SIGKILL)  # right after the last response: its flush may not have run
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()

    def expected(rows) -> Counter:
        out = Counter()
        for _, key, p, g in rows:
            out[(*key, "prompt")] += p
            out[(*key, "completion")] += g
            out[(*key, "requests")] += 1
        return out

    everything = expected(sent)
    settled = expected([s for s in sent if s[0] < killed_at - 1.0])
    proc, target = _start(tiny_llama_dir, data, tenants)
    try:
        got = _totals(target, keys["admin"])
        for key in everything:
            assert settled[key] <= got[key] <= everything[key], (
                f"{key}: stored {got[key]}, sent {everything[key]}, settled a second before the kill "
                f"{settled[key]} (seed {seed})")
        lost = sum(everything[k] - got[k] for k in everything if k[2] == "requests")
        print(f"usage lost to the SIGKILL right after the last response: {lost} of 200 requests")
        # a tenant sees its own rows only; naming another is refused
        with SwitchboardClient(target, api_key=keys["bob"]) as bob:
            assert {r.tenant for r in bob.get_usage().rows} == {"bob"}
            with pytest.raises(PermissionDenied):
                bob.get_usage(tenant="acme")
            r = bob.generate(token_ids=[11, 12, 13], max_new_tokens=5)
        # SIGHUP re-reads the tenants file: a broken one is refused (old keys keep working), a good one rotates
        (tmp_path / "tenants.toml").write_text("[tenants.bob]\nkey_sha256 = 'nope'\n")
        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(1.0)
        assert _totals(target, keys["admin"])[("bob", "", "requests")] == got[("bob", "", "requests")] + 1
        rotated = {**keys, "bob": new_key()}
        _tenants_file(tenants, rotated)
        os.kill(proc.pid, signal.SIGHUP)
        wait_until(lambda: _works(target, rotated["bob"]), timeout=10, what="the rotated key after SIGHUP")
        assert not _works(target, keys["bob"])
        time.sleep(1.2)  # more than two flush intervals: nothing may be lost now
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc, target = _start(tiny_llama_dir, data, tenants)
        final = _totals(target, keys["admin"])
        assert final[("bob", "", "requests")] == got[("bob", "", "requests")] + 1
        assert final[("bob", "", "completion")] == got[("bob", "", "completion")] + r.completion_tokens
        assert final[("bob", "", "prompt")] == got[("bob", "", "prompt")] + 3
    finally:
        proc.kill()
        proc.wait(timeout=30)
