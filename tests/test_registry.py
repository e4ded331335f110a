"""The adapter registry: naming and visibility rules, versions, refusals, delete while in use, restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.adapters.peft_format import read_adapter
from server.adapters.pool import AdapterPool
from server.adapters.registry import (
    AdapterForbidden,
    AdapterNotFound,
    AdapterRegistry,
    AdapterRejected,
    WrongBaseModel,
    open_registry,
)
from server.adapters.store import AdapterStore
from server.config import AdapterLimits, AdapterPoolConfig, EngineConfig, ModelConfig
from server.engine.engine import Engine, UnknownAdapterRequest
from server.engine.request import GenerationRequest, SamplingParams
from server.model.args import ModelArgs
from tests.adapter_files import copy_adapter, peft_adapter
from tests.engine_utils import collect


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    from tests.tiny_models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("other-base"), hidden=32, heads=2, kv_heads=1,
                               intermediate=64)


def make_registry(base_dir: Path, data: Path, slots: int = 4) -> AdapterRegistry:
    args = ModelArgs.from_dir(base_dir)
    pool = AdapterPool(AdapterPoolConfig(device_slots=slots, max_lora_rank=8), args, __import__("torch").float32,
                       "cpu", reader=lambda p: read_adapter(p, args, AdapterLimits(8, 16)))
    return open_registry(data, pool)


def test_visibility_rules(tiny_llama_dir: Path, tmp_path: Path) -> None:
    reg = make_registry(tiny_llama_dir, tmp_path / "data")
    lora = peft_adapter(tiny_llama_dir)
    reg.create("acme", "private", lora)
    reg.create("acme", "common", lora, shared=True)
    reg.create("beta", "private", lora)
    # own name first, then another tenant's shared one
    assert reg.resolve("acme", "private").pool_key == "acme/private@1"
    assert reg.resolve("beta", "private").pool_key == "beta/private@1"
    assert reg.resolve("beta", "common").pool_key == "acme/common@1"
    assert reg.resolve("beta", "acme/common").tenant == "acme"
    with pytest.raises(AdapterForbidden, match="not shared"):
        reg.resolve("beta", "acme/private")
    with pytest.raises(AdapterNotFound):
        reg.resolve("gamma", "private")  # acme's and beta's are private: invisible by bare name
    with pytest.raises(AdapterNotFound):
        reg.resolve("acme", "nope")
    assert reg.resolve("admin", "acme/private").pool_key == "acme/private@1"  # the admin sees everything
    assert {(i.tenant, i.name) for i in reg.list("beta")} == {("acme", "common"), ("beta", "private")}
    assert len(reg.list(None)) == len(reg.list("admin")) == 3
    assert reg.get("beta", "common").shared
    # two tenants sharing one name (issue 16 item 12): own first, then the longest-shared one, so the
    # bare name gamma used keeps meaning acme's; owner/name still reaches beta's
    reg.create("beta", "common", lora, shared=True)
    assert reg.resolve("beta", "common").tenant == "beta"  # own first
    assert reg.resolve("gamma", "common").pool_key == "acme/common@1"
    assert reg.resolve("gamma", "beta/common").tenant == "beta"


def test_writes_are_owner_or_admin_only(tiny_llama_dir: Path, tmp_path: Path) -> None:
    reg = make_registry(tiny_llama_dir, tmp_path / "data")
    lora = peft_adapter(tiny_llama_dir)
    reg.create("acme", "common", lora, shared=True)
    with pytest.raises(AdapterForbidden):
        reg.create("beta", "acme/common", lora)
    with pytest.raises(AdapterForbidden):
        reg.delete("beta", "acme/common")
    assert reg.create("admin", "acme/common", lora).version == 2  # admins may write for any tenant
    reg.delete("admin", "acme/common")
    with pytest.raises(AdapterNotFound):
        reg.resolve("acme", "common")


def test_versions_and_restart(tiny_llama_dir: Path, tmp_path: Path) -> None:
    reg = make_registry(tiny_llama_dir, tmp_path / "data")
    a, b = peft_adapter(tiny_llama_dir, seed=1), peft_adapter(tiny_llama_dir, seed=2, rank=2)
    first = reg.create("acme", "foo", a)
    second = reg.create("acme", "foo", b)
    assert (first.version, second.version, second.versions) == (1, 2, (1, 2))
    assert (second.kind, second.rank, second.target_modules) == ("LORA", 2, ("q_proj", "v_proj"))
    assert second.residency == "host" and second.size_bytes > 0 and second.created_at >= first.created_at
    assert reg.resolve("acme", "foo").pool_key == "acme/foo@2"
    assert reg.pool.known("acme/foo@1")  # a key handed out before the new version stays usable
    again = make_registry(tiny_llama_dir, tmp_path / "data")  # a restart: newest versions registered
    info = again.get("acme", "foo")
    assert (info.version, info.versions, info.residency) == (2, (1, 2), "disk")
    assert again.pool.known("acme/foo@2") and not again.pool.known("acme/foo@1")
    lease = again.pool.host_weights("acme/foo@2")
    assert lease.payload.rank == 2


def test_refusals_store_nothing(tiny_llama_dir: Path, other_base: Path, tmp_path: Path) -> None:
    reg = make_registry(tiny_llama_dir, tmp_path / "data")
    with pytest.raises(WrongBaseModel, match="does not fit the loaded base"):
        reg.create("acme", "foo", peft_adapter(other_base))
    bad = copy_adapter(peft_adapter(tiny_llama_dir), tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 64}))
    with pytest.raises(AdapterRejected, match="maximum rank") as exc:
        reg.create("acme", "foo", bad)
    assert not isinstance(exc.value, WrongBaseModel)
    for tenant, name in [("acme", "bad name"), ("admin", "../evil"), ("acme", "a@1")]:
        with pytest.raises(AdapterRejected, match="not allowed"):
            reg.create(tenant, name, peft_adapter(tiny_llama_dir))
    with pytest.raises(AdapterForbidden):
        reg.create("acme", "../evil", peft_adapter(tiny_llama_dir))
    assert reg.list(None) == [] and AdapterStore(tmp_path / "data" / "adapters").names() == []


def test_delete_while_in_use_lets_running_sequences_finish(tiny_llama_dir: Path, tmp_path: Path) -> None:
    engine = Engine.create(ModelConfig(path=str(tiny_llama_dir), quantize=False), EngineConfig(),
                           AdapterPoolConfig(device_slots=2, max_lora_rank=8))
    reg = open_registry(tmp_path / "data", engine.pool)
    lora = peft_adapter(tiny_llama_dir, seed=3)
    reg.create("acme", "foo", lora)
    engine.start()
    try:
        key = reg.resolve("acme", "foo").pool_key
        params = SamplingParams(max_new_tokens=40, ignore_eos=True)
        alone = collect(engine.submit(GenerationRequest("alone", (5, 6, 7), params, adapter=key)))
        handle = engine.submit(GenerationRequest("running", (5, 6, 7), params, adapter=key))
        first = handle.get(timeout=60)  # it is running (or at least admitted) now
        reg.delete("acme", "foo")
        with pytest.raises(AdapterNotFound):
            reg.resolve("acme", "foo")
        with pytest.raises(UnknownAdapterRequest):  # a new request on the old key: NOT_FOUND, not a crash
            engine.submit(GenerationRequest("late", (5, 6, 7), params, adapter=key))
        rest = collect(handle)
        assert rest.error is None and list(first.token_ids) + rest.token_ids == alone.token_ids
        assert not engine.pool.known(key) and engine.pool.stats().registered == 0  # dropped after the last user
    finally:
        engine.shutdown()
    assert AdapterStore(tmp_path / "data" / "adapters").names() == []


def test_concurrent_uploads_of_one_name_get_distinct_versions(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    reg = make_registry(tiny_llama_dir, tmp_path / "data")
    paths = [peft_adapter(tiny_llama_dir, seed=s) for s in (1, 2)]
    with ThreadPoolExecutor(8) as pool:
        infos = list(pool.map(lambda i: reg.create("acme", "busy", paths[i % 2]), range(8)))
    assert sorted(i.version for i in infos) == list(range(1, 9))
    assert reg.get("acme", "busy").versions == tuple(range(1, 9))
    store = AdapterStore(tmp_path / "data" / "adapters")
    assert [v.version for v in store.versions("acme", "busy")] == list(range(1, 9))
    for v in store.versions("acme", "busy"):
        store.verify(v)


def test_a_corrupted_stored_file_fails_its_requests_cleanly(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Files are sha256-checked when the pool reads them: bit rot after a restart fails the request, not the engine."""
    make_registry(tiny_llama_dir, tmp_path / "data").create("acme", "rot", peft_adapter(tiny_llama_dir, seed=5))
    stored = AdapterStore(tmp_path / "data" / "adapters").latest("acme", "rot")
    weights_file = stored.path / "adapter_model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-3] ^= 0x55  # a flipped bit inside a tensor: still a valid safetensors file
    weights_file.write_bytes(bytes(data))
    engine = Engine.create(ModelConfig(path=str(tiny_llama_dir), quantize=False), EngineConfig(),
                           AdapterPoolConfig(device_slots=2, max_lora_rank=8))
    reg = open_registry(tmp_path / "data", engine.pool)  # a restart on the same data directory
    assert reg.get("acme", "rot").residency == "disk"
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=3, ignore_eos=True)
        key = reg.resolve("acme", "rot").pool_key
        bad = collect(engine.submit(GenerationRequest("rot", (1, 2), params, adapter=key)))
        base = collect(engine.submit(GenerationRequest("base", (1, 2), params)))
    finally:
        engine.shutdown()
    assert bad.error is not None and "sha256" in bad.error and len(base.token_ids) == 3
