"""What a replica reads from the shared store (server.scale.shared_store) against what AdapterStore wrote."""

from __future__ import annotations

import pytest

from server.adapters.errors import AdapterNotFound
from server.adapters.store import AdapterStore
from server.engine.request import EngineStopped, InvalidRequest, QueueFull
from server.scale.remote_engine import _refusal
from server.scale.shared_store import SharedDirectory, parse_key


def _adapter_dir(path, payload: bytes):
    path.mkdir()
    (path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (path / "adapter_model.safetensors").write_bytes(payload)
    return path


def test_versions_written_by_the_store_are_read_by_key_and_deletes_are_seen(tmp_path):
    store = AdapterStore(tmp_path / "adapters")
    v1 = store.put("acme", "tone", _adapter_dir(tmp_path / "one", b"first"), meta={"kind": "LORA"})
    v2 = store.put("acme", "tone", _adapter_dir(tmp_path / "two", b"second"), shared=True)
    shared = SharedDirectory(tmp_path / "adapters")  # a second process's view: no recovery, no index
    for written in (v1, v2):
        read = shared.fetch(*parse_key(f"acme/tone@{written.version}"))
        assert (read.path, read.files, read.meta, read.shared) == (written.path, written.files, written.meta,
                                                                   written.shared)
    with pytest.raises(AdapterNotFound, match="not in the store"):
        shared.fetch("acme", "tone", 3)
    store.delete("acme", "tone")
    for version in (1, 2):
        with pytest.raises(AdapterNotFound, match="deleted"):
            shared.check("acme", "tone", version)
    v3 = store.put("acme", "tone", _adapter_dir(tmp_path / "three", b"third"))  # a name reused after a delete
    assert v3.version == 3 and shared.fetch("acme", "tone", 3).path == v3.path


@pytest.mark.parametrize("key", ["", "acme/tone", "tone@1", "acme/tone@v1", "a/b/c@1"])
def test_malformed_keys_are_not_found(key):
    with pytest.raises(AdapterNotFound, match="not an adapter pool key"):
        parse_key(key)


def test_refusals_pass_through_failures_are_retried():
    class FakeRayTaskError(Exception):  # ray's task errors carry the replica's exception as .cause
        def __init__(self, cause):
            super().__init__("wrapped")
            self.cause = cause

    for refusal in (InvalidRequest("prompt too long"), QueueFull("full"), AdapterNotFound("gone")):
        assert _refusal(FakeRayTaskError(refusal)) is refusal
    assert _refusal(FakeRayTaskError(EngineStopped("stopping"))) is None  # another replica may take it
    assert _refusal(FakeRayTaskError(RuntimeError("step loop died"))) is None
    assert _refusal(ConnectionError("actor died")) is None
