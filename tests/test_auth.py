"""Authentication, tenants and per-tenant limits, through the client against a real server."""

from __future__ import annotations

import pytest

from clients import PermissionDenied, ResourceExhausted, SwitchboardClient, Unauthenticated
from server.config import ConfigError, ServerConfig
from server.grpc_server import load_tenants
from server.tenants import TenantDirectory, TenantsFileError, hash_key, write_tenants_file
from tests.server_utils import running_server, wait_until

pytestmark = pytest.mark.timeout(300)

REQUEST = {"token_ids": [5, 6, 7], "max_new_tokens": 2}


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    from tests.peft_adapters import AdapterSpec, make_peft_adapter

    with running_server(tiny_llama_dir, tenants=["acme", "beta"], tenant_limits={"beta": 1}) as s:
        adapter = make_peft_adapter(tiny_llama_dir, AdapterSpec("secret", "lora", rank=2, seed=5),
                                    tmp_path_factory.mktemp("secret"))
        s.registry.create("acme", "secret", adapter)
        yield s


@pytest.mark.parametrize("key", [None, "", "sb-wrong-key", "Bearer"], ids=["missing", "empty", "wrong", "bearer"])
def test_missing_or_wrong_key_is_unauthenticated(server, key):
    with SwitchboardClient(server.target, api_key=key, timeout=10) as c:
        with pytest.raises(Unauthenticated, match="API key|authorization"):
            c.generate(**REQUEST)
        with pytest.raises(Unauthenticated):
            list(c.stream(**REQUEST))
        with pytest.raises(Unauthenticated):
            c.list_adapters()
        assert c.health() == "SERVING"  # health needs no key


def test_each_tenant_key_works(server):
    for tenant in ("acme", "beta", "admin"):
        with server.client(tenant, timeout=30) as c:
            assert c.generate(**REQUEST).completion_tokens == 2


def test_other_tenants_private_adapter_is_denied(server):
    with server.client("beta", timeout=30) as beta, \
            pytest.raises(PermissionDenied, match="belongs to tenant 'acme' and is not shared"):
        beta.generate(adapter="acme/secret", **REQUEST)
    with server.client("acme", timeout=30) as acme:
        assert acme.generate(adapter="secret", **REQUEST).adapter_name == "acme/secret"


def test_non_admin_may_not_act_on_another_tenant(server):
    with server.client("beta", timeout=30) as beta:
        with pytest.raises(PermissionDenied, match="only the admin tenant"):
            beta.list_adapters(tenant="acme")
        with pytest.raises(PermissionDenied, match="only the admin tenant"):
            beta.delete_adapter("secret", tenant="acme")


def test_per_tenant_concurrency_limit(server):
    with server.client("beta", timeout=60) as beta, server.client("acme", timeout=60) as acme:
        stream = beta.stream(token_ids=[5, 6], max_new_tokens=400, ignore_eos=True)
        next(stream)  # beta's only slot is taken
        with pytest.raises(ResourceExhausted, match="tenant 'beta' already has 1 requests in flight"):
            beta.generate(**REQUEST)
        assert acme.generate(**REQUEST).completion_tokens == 2  # other tenants are unaffected
        stream.close()  # cancels the call; the slot frees
        wait_until(lambda: _generate_ok(beta), timeout=10, what="beta's slot to free")


def _generate_ok(client) -> bool:
    try:
        return client.generate(**REQUEST).completion_tokens == 2
    except ResourceExhausted:
        return False


def test_tenants_file_round_trip_and_refusals(tmp_path):
    path = write_tenants_file(tmp_path / "tenants.toml", {"admin": "k-admin", "acme": "k-acme"}, {"acme": 3})
    directory = TenantDirectory.from_file(path)
    admin = directory.authenticate([("authorization", "Bearer k-admin")])
    acme = directory.authenticate([("authorization", "bearer k-acme")])
    assert (admin.name, admin.is_admin) == ("admin", True)
    assert (acme.name, acme.is_admin, acme.max_concurrent) == ("acme", False, 3)
    assert "k-acme" not in path.read_text() and hash_key("k-acme") in path.read_text()
    bad = {
        "no tenants": ("x = 1\n", "at least one"),
        "bad name": ('[tenants."Bad Name"]\nkey_sha256 = "' + "0" * 64 + '"\n', "must match"),
        "not a digest": ('[tenants.a]\nkey_sha256 = "plain-key"\n', "not a sha256 hex digest"),
        "shared key": ('[tenants.a]\nkey_sha256 = "' + "1" * 64 + '"\n[tenants.b]\nkey_sha256 = "' + "1" * 64 + '"\n',
                       "given to both"),
        "bad limit": ('[tenants.a]\nkey_sha256 = "' + "2" * 64 + '"\nmax_concurrent = 0\n', "max_concurrent"),
        "unknown key": ('[tenants.a]\nkey_sha256 = "' + "3" * 64 + '"\nkey = "x"\n', "unknown keys"),
        "not toml": ("[tenants\n", "cannot read"),
    }
    for text, fragment in bad.values():
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(TenantsFileError, match=fragment):
            TenantDirectory.from_file(tmp_path / "bad.toml")


def test_public_bind_needs_a_tenants_file(tmp_path):
    with pytest.raises(ConfigError, match="without a tenants file"):
        load_tenants(ServerConfig(host="0.0.0.0"))
    assert load_tenants(ServerConfig(host="127.0.0.1")).open  # loopback: the single local tenant
    path = write_tenants_file(tmp_path / "t.toml", {"admin": "k"})
    assert not load_tenants(ServerConfig(host="0.0.0.0", tenants_file=path)).open
    from server.serve_cli import main

    assert main(["--host", "0.0.0.0", "--port", "0", "--no-metrics"]) == 2  # refused before loading the model
