"""Issue 16 (hardening): one caller can no longer hurt another. Each test names the item it covers and
failed on main before the fix; the bad-input tables (test_bad_requests.py, test_admin.py) hold the rest."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
import threading
import time

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2_grpc

from clients import ResourceExhausted
from server.config import AdapterPoolConfig, EngineConfig
from switchboard.v1 import admin_pb2, admin_pb2_grpc
from tests.adapter_files import peft_adapter, tar_bytes
from tests.server_utils import running_server, wait_until

pytestmark = pytest.mark.timeout(300)
REQUEST = {"token_ids": [5, 6, 7], "max_new_tokens": 2}


def _held_stream(channel, release: threading.Event, metadata=()):
    """A reflection stream that sends nothing until `release` is set (its call object)."""

    def requests():
        release.wait()
        yield from ()

    return reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(requests(), metadata=metadata)


def test_keyless_reflection_streams_cannot_lock_out_tenants(tiny_llama_dir):
    """Item 2: on main ~340 keyless reflection streams held every worker (health, Generate and Admin then got
    RESOURCE_EXHAUSTED). Here the server has 24 workers; 40 held streams get at most the keyless share."""
    engine_cfg = EngineConfig(max_running=4, max_waiting=4)
    with running_server(tiny_llama_dir, tenants=["acme"], engine_cfg=engine_cfg, grpc_workers=24,
                        max_open_streams=8, open_stream_idle_s=2.0) as srv:
        release = threading.Event()
        channels = [grpc.insecure_channel(srv.target) for _ in range(4)]
        try:
            calls = [_held_stream(channels[i % 4], release) for i in range(40)]
            wait_until(lambda: srv.server.open_streams.open() == 4 or sum(
                not c.running() and c.code() is not None for c in calls) >= 36, timeout=20, what="streams to settle")
            refused = [c for c in calls if c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
            assert len(refused) >= 36, [c.code() for c in calls]  # per peer address: 8 // 2 at once
            with srv.client("acme", timeout=30) as acme:
                assert acme.health() == "SERVING"
                assert acme.generate(**REQUEST).completion_tokens == 2
                assert acme.list_adapters() == []
            # idle keyless streams are ended by the server, with a reason
            held = [c for c in calls if c not in refused]
            wait_until(lambda: all(c.code() is not None for c in held), timeout=20, what="idle streams to end")
            assert {c.code() for c in held} == {grpc.StatusCode.DEADLINE_EXCEEDED}, [c.details() for c in held]
            assert "sent nothing" in held[0].details()
            wait_until(lambda: srv.server.open_streams.open() == 0, timeout=10, what="stream slots to free")
        finally:
            release.set()
            for ch in channels:
                ch.close()


def _slow_upload(srv, tenant: str, payload: bytes, gap_s: float, stop: threading.Event, name: str = "slow"):
    meta = admin_pb2.UploadMetadata(name=name, sha256=hashlib.sha256(payload).hexdigest(), total_bytes=len(payload))

    def chunks():
        yield admin_pb2.UploadChunk(metadata=meta)
        for i in range(len(payload)):
            if stop.wait(gap_s):
                return
            yield admin_pb2.UploadChunk(data=payload[i:i + 1])

    channel = grpc.insecure_channel(srv.target)
    call = admin_pb2_grpc.AdminStub(channel).UploadAdapter.future(
        chunks(), metadata=(("authorization", f"Bearer {srv.keys[tenant]}"),), timeout=60)
    return channel, call


def test_idle_and_trickling_uploads_are_bounded(tiny_llama_dir):
    """Item 3: on main an upload that sent its metadata and then a byte every 5 s held a worker and a staging
    directory forever, and ~336 of them locked everyone out. Now: per-tenant and total caps, an idle
    timeout and a minimum average rate."""
    good = tar_bytes(peft_adapter(tiny_llama_dir))
    with running_server(tiny_llama_dir, tenants=["acme", "bob"], max_uploads_per_tenant=2, max_uploads=3,
                        upload_idle_timeout_s=1.5, upload_rate_grace_s=2.0, upload_min_rate=1000) as srv:
        stop = threading.Event()
        idle = [_slow_upload(srv, "acme", good, 3600, stop, f"idle{i}") for i in range(2)]
        try:
            wait_until(lambda: _uploads(srv) == 2, timeout=10,
                       what="two uploads in flight")
            with srv.client("acme", timeout=30) as acme, pytest.raises(ResourceExhausted, match="2 uploads in flight"):
                acme.upload_adapter(peft_adapter(tiny_llama_dir), "third")
            trickle = _slow_upload(srv, "bob", good, 0.2, stop, "trickle")  # the third slot: bob's
            for _, call in idle:
                with pytest.raises(grpc.RpcError) as exc:
                    call.result(timeout=30)
                assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "sent nothing for 1.5 s" in exc.value.details()
            with pytest.raises(grpc.RpcError) as exc:
                trickle[1].result(timeout=30)
            assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "too slow" in exc.value.details()
            wait_until(lambda: _uploads(srv) == 0, timeout=10, what="upload slots to free")
            staging = srv.registry.store.root / ".staging"
            wait_until(lambda: not any(staging.iterdir()) if staging.exists() else True, timeout=10,
                       what="staging to empty")
            with srv.client("acme", timeout=30) as acme:  # and uploads work again
                assert acme.upload_adapter(peft_adapter(tiny_llama_dir), "after").version == 1
        finally:
            stop.set()
            for channel, _ in [*idle, trickle]:
                channel.close()


def _uploads(srv) -> int:
    return srv.server.admin.gate.in_flight()


def test_a_header_declaring_a_huge_tensor_is_refused_before_its_data_is_read(tiny_llama_dir, tmp_path):
    """Item 4: on main a 0.5 MB gzip upload holding a 500 MB zero tensor was unpacked and loaded whole before its
    key was checked. The safetensors header is now checked against the base while the tar streams in."""
    from server.adapters.errors import WrongBaseModel
    from server.adapters.upload import extract_adapter_tar
    from server.adapters.validation import check_safetensors_stream
    from server.config import AdapterLimits
    from server.model.args import ModelArgs

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    n = 64 << 20
    header = json.dumps({key: {"dtype": "F32", "shape": [4, n // 16], "data_offsets": [0, n]}}).encode()
    weights = struct.pack("<Q", len(header)) + header + b"\0" * n
    cfg = (peft_adapter(tiny_llama_dir) / "adapter_config.json").read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("adapter_config.json", cfg), ("adapter_model.safetensors", weights)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    payload = tmp_path / "bomb.tar.gz"
    payload.write_bytes(gzip.compress(buf.getvalue(), compresslevel=1))
    assert payload.stat().st_size < 1 << 20
    args, limits = ModelArgs.from_dir(tiny_llama_dir), AdapterLimits(max_lora_rank=8, max_virtual_tokens=16)

    def check(stream, size):
        from server.adapters.peft_format import BaseModelMismatch

        try:
            return check_safetensors_stream(stream, size, args, limits)
        except BaseModelMismatch as exc:
            raise WrongBaseModel(str(exc)) from None

    with pytest.raises(WrongBaseModel, match="the base needs 64"):
        extract_adapter_tar(payload, tmp_path / "out", max_bytes=512 << 20, check_weights=check)
    written = tmp_path / "out" / "adapter_model.safetensors"
    assert written.stat().st_size <= 8 + len(header)  # nothing past the header was read out


def test_chat_rendering_matches_the_template_and_runs_outside_the_tokenizer_lock(tiny_llama_dir):
    """Item 6: the rendered chat is bounded and only the encoding holds the tokenizer lock (on main the whole
    apply_chat_template ran under it). Oracle: apply_chat_template(tokenize=True) gives the same ids."""
    from server.service import InferenceServicer
    from switchboard.v1 import inference_pb2 as pb

    with running_server(tiny_llama_dir) as srv:
        servicer = InferenceServicer(srv.engine, srv.registry, None, None)
        tokenizer = srv.engine.tokenizer
        seen_locked = []
        real = tokenizer.apply_chat_template

        def spy(*args, **kwargs):
            seen_locked.append(servicer._tokenizer_lock.locked())
            return real(*args, **kwargs)

        for messages in ([("user", "Name three colors.")],
                         [("system", "Be brief."), ("user", "hi"), ("assistant", "hello"), ("user", "é 😀 <b>")]):
            req = pb.GenerateRequest(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages])
            expected = real([{"role": r, "content": c} for r, c in messages], add_generation_prompt=True)
            expected = expected["input_ids"] if hasattr(expected, "keys") else expected
            tokenizer.apply_chat_template = spy
            try:
                assert servicer._tokens(req, "messages") == list(expected)
            finally:
                del tokenizer.apply_chat_template
        assert seen_locked == [False, False]


def test_two_authorization_headers_are_refused(tiny_llama_dir):
    """Item 10: on main the first of two `authorization` headers won."""
    from server.tenants import TenantDirectory, Unauthenticated, hash_key

    directory = TenantDirectory.from_mapping({"tenants": {"acme": {"key_sha256": hash_key("k1")}}})
    assert directory.authenticate([("authorization", "Bearer k1")]).name == "acme"
    for headers in ([("authorization", "Bearer k1"), ("authorization", "Bearer k1")],
                    [("authorization", "Bearer k1"), ("authorization", "Bearer wrong")]):
        with pytest.raises(Unauthenticated, match="2 authorization headers"):
            directory.authenticate(headers)
    with running_server(tiny_llama_dir, tenants=["acme"]) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        key = ("authorization", f"Bearer {srv.keys['acme']}")
        with pytest.raises(grpc.RpcError) as exc:
            stub.ListAdapters(admin_pb2.ListAdaptersRequest(), metadata=(key, ("authorization", "Bearer x")))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert len(stub.ListAdapters(admin_pb2.ListAdaptersRequest(), metadata=(key,)).adapters) == 0


def test_metrics_labels_are_per_tenant_and_never_another_tenants_private_name():
    """Item 11: on main the 32 label slots went to whoever came first and a private name was a label anywhere."""
    from prometheus_client import generate_latest

    from server.metrics import ServerMetrics
    from tests.server_utils import metric_values

    m = ServerMetrics(max_adapter_labels=4)
    for i in range(50):  # bob fills the slots with junk names first
        m.observe_request("bob", f"bob/junk{i}", "OK", total_s=0.1, shared=False)
    m.observe_request("alice", "alice/prod", "OK", total_s=0.1, shared=False)
    m.observe_request("admin", "alice/secret", "OK", total_s=0.1, shared=False)  # an admin using a private one
    m.observe_request("bob", "alice/tool", "OK", total_s=0.1, shared=True)
    scrape = generate_latest(m.registry).decode()
    labels = {(dict(ls)["tenant"], dict(ls)["adapter"]) for (n, ls) in metric_values(scrape)
              if n == "switchboard_requests_total"}
    assert ("alice", "alice/prod") in labels  # not pushed into "other" by bob
    assert not any(a == "alice/secret" for _, a in labels) and ("admin", "other") in labels
    assert ("bob", "other") in labels and len({a for t, a in labels if t == "bob"}) == 5  # 4 own + other
    assert ("bob", "alice/tool") not in labels or len({a for t, a in labels if t == "bob"}) <= 5


def test_metrics_bind_loopback_unless_asked():
    """Item 11: on main /metrics bound --host (0.0.0.0 in Docker) for anyone to read."""
    from server.serve_cli import configs, parse_args

    *_, server = configs(parse_args(["--host", "0.0.0.0", "--tenants", "t.toml"]))
    assert (server.host, server.metrics_host) == ("0.0.0.0", "127.0.0.1")
    *_, server = configs(parse_args(["--metrics-host", "0.0.0.0"]))
    assert server.metrics_host == "0.0.0.0"


def test_shared_name_resolution_is_stable(tiny_llama_dir, tmp_path):
    """Item 12: on main `adapter="tool"` became NOT_FOUND once a second tenant shared a "tool"."""
    from tests.test_registry import make_registry

    reg = make_registry(tiny_llama_dir, tmp_path / "data")
    lora = peft_adapter(tiny_llama_dir)
    reg.create("bob", "tool", lora)  # private first (older), shared only later
    reg.create("alice", "tool", lora, shared=True)
    assert reg.resolve("gamma", "tool").tenant == "alice"
    time.sleep(0.01)
    reg.create("bob", "tool", lora, shared=True)  # bob shares his now: gamma's "tool" does not move
    assert reg.resolve("gamma", "tool").tenant == "alice"
    assert reg.resolve("bob", "tool").tenant == "bob"  # own first
    reg.create("alice", "tool", lora, shared=False)  # alice stops sharing: bob's is the one left
    assert reg.resolve("gamma", "tool").tenant == "bob"
    reg2 = make_registry(tiny_llama_dir, tmp_path / "data")  # the same after a restart
    assert reg2.resolve("gamma", "tool").tenant == "bob"


def test_tenants_cli_and_one_name_rule(tiny_llama_dir, tmp_path, capsys):
    """Item 13: on main `new --help` wrote a tenant called --help, `new 'Bad Name'` wrote invalid TOML, and the
    registry stored adapters for tenants that do not exist."""
    import tomllib

    from server.adapters.errors import AdapterRejected
    from server.adapters.registry import open_registry
    from server.tenants import TenantDirectory, main, write_tenants_file

    with pytest.raises(SystemExit) as exc:
        main(["new", "--help"])
    assert exc.value.code == 0 and "[tenants" not in capsys.readouterr().out
    for bad in (["new", "Bad Name"], ["new", "Alice"], ["new", "a", "a"], ["new", "x" * 65]):
        assert main(bad) == 2, bad
        assert capsys.readouterr().out == ""
    assert main(["new", "acme", "admin"]) == 0
    out = capsys.readouterr()
    directory = TenantDirectory.from_mapping(tomllib.loads(out.out))
    assert directory.tenants == ["acme", "admin"]
    key = out.err.split("# acme: ")[1].split()[0]
    assert directory.authenticate([("authorization", f"Bearer {key}")]).name == "acme"
    with pytest.raises(ValueError, match="not allowed"):
        write_tenants_file(tmp_path / "t.toml", {"Bad Name": "k"})
    from tests.test_registry import make_registry

    pool = make_registry(tiny_llama_dir, tmp_path / "d0").pool
    reg = open_registry(tmp_path / "d1", pool, known_tenants=frozenset({"acme", "admin"}))
    lora = peft_adapter(tiny_llama_dir)
    for owner, words in (("ghost", "no tenant 'ghost'"), ("Alice", "tenant name 'Alice' is not allowed")):
        with pytest.raises(AdapterRejected, match=words):
            reg.create("admin", f"{owner}/x", lora)
    assert reg.create("admin", "acme/x", lora).tenant == "acme"


def test_admin_merge_into_an_unknown_tenant_is_refused(tiny_llama_dir):
    """Item 13 through the API: the admin may act for tenants that exist, not for invented ones."""
    with running_server(tiny_llama_dir, tenants=["acme"]) as srv, srv.client("admin", timeout=30) as admin:
        admin.upload_adapter(peft_adapter(tiny_llama_dir), "src", tenant="acme", shared=True)
        with pytest.raises(Exception) as exc:  # noqa: PT011 - the code is checked
            admin.merge_adapters("m", ["acme/src"], tenant="ghost")
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT and "no tenant 'ghost'" in exc.value.message


def test_validation_bounds(tiny_llama_dir):
    """Items 7/8 units: scales and weights finite after conversion and bounded; configs bounded in depth."""
    import torch

    from server.adapters.peft_format import AdapterFormatError
    from server.adapters.validation import MAX_JSON_DEPTH, check_config, check_finite, check_scale, json_depth_ok

    assert check_scale("lora_alpha", 16) == 16.0
    for bad in (float("nan"), float("inf"), 1e38, 10**400, True, "8", None):
        with pytest.raises(AdapterFormatError, match="lora_alpha"):
            check_scale("lora_alpha", bad)
    assert check_finite("t", torch.ones(2, 2, dtype=torch.float64)).dtype == torch.float32
    for bad in (torch.full((2,), 1e300, dtype=torch.float64), torch.full((2,), 3e38),
                torch.tensor([1.0, float("nan")])):
        with pytest.raises(AdapterFormatError, match="tensor 't'"):
            check_finite("t", bad)
    with pytest.raises(AdapterFormatError, match="NaN or Inf"):  # finite in f32, inf in f16
        check_finite("t", torch.full((2,), 7e4), torch.float16)
    assert json_depth_ok("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    assert not json_depth_ok("[" * (MAX_JSON_DEPTH + 1))
    assert json_depth_ok('"' + "[" * 1000 + '"')  # brackets inside strings do not nest
    with pytest.raises(AdapterFormatError, match="nested deeper"):
        check_config(b'{"peft_type": "LORA", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    cfg = json.loads((peft_adapter(tiny_llama_dir) / "adapter_config.json").read_text())
    assert check_config(json.dumps(cfg).encode()) == cfg
    with pytest.raises(AdapterFormatError, match="field target_modules must list strings"):
        check_config(json.dumps({**cfg, "target_modules": [1, 2]}).encode())


@pytest.fixture
def _pool_cfg():
    return AdapterPoolConfig(device_slots=2, max_lora_rank=8)


def test_served_adapters_are_unchanged_by_the_checks(tiny_llama_dir, _pool_cfg):
    """The checks refuse only what they should: a PEFT-made adapter uploads and serves as before."""
    with running_server(tiny_llama_dir, tenants=["acme"], pool_cfg=_pool_cfg) as srv, \
            srv.client("acme", timeout=30) as acme:
        for kind in ("lora", "ia3", "prefix", "prompt"):
            info = acme.upload_adapter(peft_adapter(tiny_llama_dir, kind=kind), f"ok-{kind}")
            assert info.version == 1
            assert acme.generate(adapter=f"ok-{kind}", **REQUEST).completion_tokens == 2
