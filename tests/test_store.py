"""The on-disk adapter store: atomic versioned commits, sha256 per file, recovery after a crash at any point."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import server.adapters.store as store_mod
from server.adapters.store import STAGING, AdapterStore, StoreError


def make_src(root: Path, tag: str, size: int = 3000) -> Path:
    src = root / f"src-{tag}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "tag": tag}))
    (src / "adapter_model.safetensors").write_bytes(os.urandom(size))
    return src


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_put_records_sha256_and_versions_grow(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    src = make_src(tmp_path, "a")
    v1 = store.put("acme", "foo", src, meta={"kind": "LORA"})
    v2 = store.put("acme", "foo", make_src(tmp_path, "b"), shared=True)
    assert (v1.version, v2.version) == (1, 2)
    assert v1.files["adapter_model.safetensors"]["sha256"] == sha(src / "adapter_model.safetensors")
    assert v1.files["adapter_config.json"]["size"] == (src / "adapter_config.json").stat().st_size
    assert v1.meta == {"kind": "LORA"} and v2.shared and not v1.shared
    assert [v.version for v in store.versions("acme", "foo")] == [1, 2]
    assert store.latest("acme", "foo") == v2 and store.latest("acme", "bar") is None
    store.verify(v1)
    reopened = AdapterStore(tmp_path / "store")
    assert reopened.versions("acme", "foo") == store.versions("acme", "foo")
    assert reopened.names() == [("acme", "foo")]


def test_corruption_is_detected_by_verify(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    v = store.put("acme", "foo", make_src(tmp_path, "a"))
    data = bytearray((v.path / "adapter_model.safetensors").read_bytes())
    data[10] ^= 0xFF
    (v.path / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(StoreError, match="sha256"):
        store.verify(v)


def test_delete_then_recreate_never_reuses_a_version(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    for tag in "abc":
        store.put("acme", "foo", make_src(tmp_path, tag))
    gone = store.delete("acme", "foo")
    assert [v.version for v in gone] == [1, 2, 3] and not any(v.path.exists() for v in gone)
    assert store.versions("acme", "foo") == [] and store.names() == []
    assert store.put("acme", "foo", make_src(tmp_path, "d")).version == 4
    assert AdapterStore(tmp_path / "store").put("acme", "foo", make_src(tmp_path, "e")).version == 5


@pytest.mark.parametrize(("tenant", "name"), [("acme", "../x"), ("acme", "a/b"), ("", "x"), ("acme", ".hidden"),
                                              ("acme", "x" * 65), ("ac me", "x")])
def test_bad_names_are_refused(tmp_path: Path, tenant: str, name: str) -> None:
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(ValueError, match="not allowed"):
        store.put(tenant, name, make_src(tmp_path, "a"))
    assert store.names() == []


def test_reopen_removes_leftovers_of_interrupted_writes(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = AdapterStore(root)
    done = store.put("acme", "foo", make_src(tmp_path, "a"))
    half = root / STAGING / "deadbeef"  # a version being copied when the process died
    half.mkdir(parents=True)
    (half / "adapter_model.safetensors").write_bytes(b"partial")
    (done.path.parent / ".deleted_through.123.tmp").write_bytes(b"9")  # an interrupted atomic write
    reopened = AdapterStore(root)
    assert not (root / STAGING).exists() or not any((root / STAGING).iterdir())
    assert not list(done.path.parent.glob(".*.tmp"))
    assert [v.version for v in reopened.versions("acme", "foo")] == [1]
    reopened.verify(reopened.latest("acme", "foo"))


def test_reopen_finishes_an_interrupted_delete(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = AdapterStore(root)
    for tag in "ab":
        store.put("acme", "foo", make_src(tmp_path, tag))
    (root / "acme" / "foo" / "deleted_through").write_text("2")  # the marker landed, the rmtree did not
    reopened = AdapterStore(root)
    assert reopened.names() == [] and not list((root / "acme" / "foo").glob("v*"))
    assert reopened.put("acme", "foo", make_src(tmp_path, "c")).version == 3


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (cleanup included)."""


def test_a_crash_at_every_io_step_leaves_the_store_consistent(tmp_path: Path, monkeypatch) -> None:
    """Fault injection: die before the k-th fsync/rename/write of a put or delete, for every k."""
    real = {"fsync": os.fsync, "rename": os.rename, "replace": os.replace}
    root = tmp_path / "store"
    for op in ("put", "delete"):
        k = 0
        while True:
            k += 1
            calls = {"n": 0}

            def dying(name, *a, _k=k, _calls=calls):
                _calls["n"] += 1
                if _calls["n"] == _k:
                    raise Killed
                return real[name](*a)

            store = AdapterStore(root)
            before = {(t, n): [v.version for v in store.versions(t, n)] for t, n in store.names()}
            src = make_src(tmp_path, f"{op}{k}")
            with monkeypatch.context() as m:
                for name in real:
                    m.setattr(store_mod.os, name, lambda *a, _n=name: dying(_n, *a))
                m.setattr(store_mod.shutil, "rmtree", lambda *a, **kw: None)  # no cleanup after a kill
                try:
                    if op == "put":
                        store.put("acme", "foo", src)
                    else:
                        store.delete("acme", "foo")
                    finished = True
                except Killed:
                    finished = False
            after = AdapterStore(root)
            versions = [v.version for v in after.versions("acme", "foo")]
            old = before.get(("acme", "foo"), [])
            if op == "put":  # either the old list or the old list plus one complete new version
                assert versions in (old, [*old, max(old, default=0) + 1]), (k, versions)
                if finished:
                    assert len(versions) == len(old) + 1
            else:  # a delete is all or nothing
                assert versions in (old, []), (k, versions)
                if finished:
                    assert versions == []
            for v in after.versions("acme", "foo"):
                after.verify(v)
            assert not (root / STAGING).exists() or not any((root / STAGING).iterdir())
            if finished:
                break
        if op == "delete":  # leave something for the next round
            AdapterStore(root).put("acme", "foo", make_src(tmp_path, "again"))
        assert k > 3  # the fault injection really hit several steps


_WRITER = """
import os, sys
from pathlib import Path
from server.adapters.store import AdapterStore
root, src = Path(sys.argv[1]), Path(sys.argv[2])
store = AdapterStore(root)
i = 0
while True:
    v = store.put("acme", f"n{i % 3}", src)
    print(f"{v.name} {v.version}", flush=True)
    i += 1
"""


def test_sigkill_during_writes_keeps_every_completed_version(tmp_path: Path) -> None:
    """A real process putting versions in a loop is SIGKILLed; every version it reported is there, intact."""
    root = tmp_path / "store"
    src = make_src(tmp_path, "big", size=2 << 20)  # 2 MiB: the kill lands mid-copy often
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    reported: set[tuple[str, ...]] = set()
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(src)], stdout=subprocess.PIPE,
                                text=True, env=env)
        first = proc.stdout.readline()  # writing for real now; kill it a little later, at some point of a put
        assert first, "the writer never completed a version"
        time.sleep(0.2 + 0.23 * round_)
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        this_round = {tuple(line.split()) for line in (first + out).splitlines() if line.strip()}
        reported |= this_round
        store = AdapterStore(root)
        present = {(v.name, str(v.version)) for t, n in store.names() for v in store.versions(t, n)}
        assert reported <= present
        assert len(present - reported) <= round_ + 1  # per kill, at most one committed but not yet reported
        for t, n in store.names():
            for v in store.versions(t, n):
                store.verify(v)
