"""Quotas (server/quotas.py) and tenants-file reloads, in isolation and through a real server.

Token buckets are checked on a fake clock (exact refill arithmetic); the server test drains a real
tokens-per-minute bucket, reads the retry-after hint, waits it out and is served again, while another
tenant is never refused. Reloads (Admin.ReloadTenants; SIGHUP runs the same method) rotate keys and
change quotas for new calls only; a broken file is refused with its reason and the old one stays.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from clients import SwitchboardClient
from clients.errors import FailedPrecondition, PermissionDenied, ResourceExhausted, Unauthenticated
from server.quotas import QuotaExceeded, Quotas, TenantLimits, TokenBucket, check_storage, parse_limits
from server.tenants import TenantDirectory, TenantsFileError, hash_key, new_key
from tests.adapter_files import peft_adapter
from tests.server_utils import metric, running_server


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_refills_at_capacity_per_minute_and_allows_debt() -> None:
    clock = Clock()
    b = TokenBucket(120, clock=clock)  # 2 tokens / s
    assert b.wait_for(120) == 0
    b.charge(150)  # a long completion: 30 in debt
    assert b.wait_for(10) == pytest.approx(20.0)  # (10 + 30) / 2
    clock.t += 20
    assert b.wait_for(10) == 0
    clock.t += 3600  # never above capacity
    assert b.wait_for(121) == pytest.approx(0.5)


def test_quotas_refuse_with_retry_after_take_nothing_and_refill() -> None:
    clock = Clock()
    q = Quotas(clock=clock)
    limits = TenantLimits(tokens_per_minute=60, requests_per_minute=3)
    q.admit("acme", limits, 20)
    q.charge_completion("acme", limits, 30)  # 10 tokens left
    with pytest.raises(QuotaExceeded) as exc:
        q.admit("acme", limits, 20)
    assert exc.value.limit == "tokens_per_minute" and exc.value.retry_after_s == pytest.approx(10.0)
    assert "tokens_per_minute limit of 60" in str(exc.value) and exc.value.retry_after_header == "10"
    q.admit("other", limits, 20)  # buckets are per tenant
    clock.t += 10
    q.admit("acme", limits, 20)  # refilled; the refused call took no request token
    q.admit("acme", TenantLimits(requests_per_minute=3), 1)
    with pytest.raises(QuotaExceeded) as exc:  # the 4th request within the minute
        q.admit("acme", TenantLimits(requests_per_minute=3), 1)
    # 3 - 1 (t=1000) + 0.5 refilled by t=1010 - 1 - 1 = 0.5 left, at 3 per minute: 10 s to the next one
    assert exc.value.limit == "requests_per_minute" and exc.value.retry_after_s == pytest.approx(10.0)
    with pytest.raises(QuotaExceeded) as exc:  # can never fit: no retry hint
        q.admit("acme", limits, 61)
    assert exc.value.retry_after_s is None and "more than its tokens_per_minute" in str(exc.value)


def test_limits_parse_and_storage_check() -> None:
    assert parse_limits("t", {"weight": 2, "tokens_per_minute": 1000.0}) == TenantLimits(2.0, 1000)
    for bad in ({"weight": 0}, {"weight": True}, {"tokens_per_minute": -1}, {"max_adapters": "5"},
                {"requests_per_minute": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            parse_limits("t", bad)
    with pytest.raises(TenantsFileError, match="weight"):
        TenantDirectory.from_mapping({"tenants": {"a": {"key_sha256": hash_key("k"), "weight": -1}}})

    class Info:
        def __init__(self, name: str, size: int) -> None:
            self.name, self.size_bytes = name, size

    own = [Info("a", 100), Info("b", 100)]
    check_storage("t", TenantLimits(max_adapters=2), own, "a", 50)  # a new version of an existing one
    with pytest.raises(QuotaExceeded, match="max_adapters limit is 2"):
        check_storage("t", TenantLimits(max_adapters=2), own, "c", 50)
    with pytest.raises(QuotaExceeded, match="max_adapter_bytes limit of 250"):
        check_storage("t", TenantLimits(max_adapter_bytes=250), own, "c", 51)


def _write(path: Path, entries: dict[str, dict]) -> Path:
    lines = []
    for name, fields in entries.items():
        lines.append(f"[tenants.{name}]")
        lines += [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in fields.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@pytest.fixture()
def keyed(tiny_llama_dir: Path, tmp_path: Path):
    keys = {"admin": new_key(), "acme": new_key(), "other": new_key()}
    path = _write(tmp_path / "tenants.toml", {
        "admin": {"key_sha256": hash_key(keys["admin"])},
        "acme": {"key_sha256": hash_key(keys["acme"]), "tokens_per_minute": 240, "max_adapters": 1},
        "other": {"key_sha256": hash_key(keys["other"])},
    })
    with running_server(tiny_llama_dir, tenants=keys, tenants_file=path) as srv:
        with srv.client("admin") as admin:
            assert admin.reload_tenants() == ["acme", "admin", "other"]  # the file's limits now in force
        yield srv, path, keys


def test_tokens_per_minute_exhausts_then_refills_and_others_are_unaffected(keyed) -> None:
    srv, _, _ = keyed
    ids = list(range(100, 108))  # 8 prompt tokens + 52 generated = 60 per request; 240 per minute = 4 s^-1
    with srv.client("acme") as acme, srv.client("other") as other:
        served = 0
        with pytest.raises(ResourceExhausted) as exc:
            for _ in range(10):
                r = acme.generate(token_ids=ids, max_new_tokens=52, ignore_eos=True)
                served += 1
                assert r.prompt_tokens + r.completion_tokens == 60
        assert served == 4, f"240 tokens per minute should serve 4 requests of 60 tokens, served {served}"
        assert "tokens_per_minute limit of 240" in exc.value.message
        retry = exc.value.retry_after_s
        assert retry is not None and 1 <= retry <= 3, retry  # 8 tokens at 4 per second, rounded up
        for _ in range(3):
            other.generate(token_ids=ids, max_new_tokens=52, ignore_eos=True)  # never throttled
        time.sleep(retry)
        assert acme.generate(token_ids=ids, max_new_tokens=4).prompt_tokens == 8  # refilled: served again
    scrape = srv.scrape()
    assert metric(scrape, "switchboard_throttled_requests_total", tenant="acme", limit="tokens_per_minute") == 1
    assert metric(scrape, "switchboard_throttled_requests_total", tenant="other") == 0


def test_max_adapters_refuses_a_second_adapter(keyed, tiny_llama_dir: Path) -> None:
    srv, _, _ = keyed
    with srv.client("acme") as acme:
        acme.upload_adapter(peft_adapter(tiny_llama_dir), "one")
        assert acme.upload_adapter(peft_adapter(tiny_llama_dir, seed=1), "one").version == 2  # same name: fine
        with pytest.raises(ResourceExhausted, match="max_adapters limit is 1"):
            acme.upload_adapter(peft_adapter(tiny_llama_dir), "two")
        with pytest.raises(ResourceExhausted, match="max_adapters"):
            acme.merge_adapters("merged", ["one"], method="linear")
        assert [a.name for a in acme.list_adapters() if a.tenant == "acme"] == ["one"]


def test_reload_rotates_keys_changes_quotas_and_refuses_a_broken_file(keyed) -> None:
    srv, path, keys = keyed
    rotated = new_key()
    with srv.client("acme") as acme, srv.client("admin") as admin:
        stream = acme.stream(token_ids=list(range(100, 108)), max_new_tokens=40, ignore_eos=True)
        first = next(stream)  # running across the reload
        _write(path, {"admin": {"key_sha256": hash_key(keys["admin"])},
                      "acme": {"key_sha256": hash_key(rotated), "requests_per_minute": 1}})
        assert admin.reload_tenants() == ["acme", "admin"]
        rest = list(stream)
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 40 and rest[-1].finished
        with pytest.raises(Unauthenticated):  # the old key is gone for new calls
            acme.generate(token_ids=[5, 6], max_new_tokens=2)
        path.write_text("[tenants.acme]\nkey_sha256 = 12\n")
        with pytest.raises(FailedPrecondition, match="old one stays in force.*key_sha256"):
            admin.reload_tenants()
    with SwitchboardClient(srv.target, api_key=rotated) as acme2:
        acme2.generate(token_ids=[5, 6], max_new_tokens=2)  # the rotated key, still in force
        with pytest.raises(ResourceExhausted, match="requests_per_minute"):  # the new quota
            acme2.generate(token_ids=[5, 6], max_new_tokens=2)
        with pytest.raises(PermissionDenied):
            acme2.reload_tenants()


def test_scheduling_flags_and_default() -> None:
    from server.serve_cli import configs, default_scheduling, parse_args

    assert default_scheduling(["admin", "acme"]) == "vtc" and default_scheduling(["local"]) == "fcfs"
    _, engine, _, _ = configs(parse_args(["--scheduling", "vtc", "--w-in", "0.5", "--w-out", "3"]))
    assert (engine.scheduling, engine.w_in, engine.w_out) == ("vtc", 0.5, 3.0)
    assert configs(parse_args([]))[1].scheduling == "fcfs"  # main() then applies default_scheduling


def test_usage_cli_prints_the_callers_usage(keyed, capsys) -> None:
    import json

    from clients.__main__ import main as cli

    srv, _, keys = keyed
    with srv.client("other") as other:
        r = other.generate(token_ids=[7, 8, 9], max_new_tokens=3, ignore_eos=True)
    assert cli(["--target", srv.target, "--api-key", keys["other"], "usage", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["prompt_tokens"], report["completion_tokens"], report["requests"]) == (3, r.completion_tokens, 1)
    assert {row["tenant"] for row in report["rows"]} == {"other"}
    assert cli(["--target", srv.target, "--api-key", keys["admin"], "usage"]) == 0
    table = capsys.readouterr().out
    # total: prompt, of which cached (the prefix cache), completion, requests
    assert "other" in table and table.strip().splitlines()[-1].split()[1:] == ["3", "0", "3", "1"]
