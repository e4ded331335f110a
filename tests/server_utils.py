"""`running_server(...)`: a real Switchboard gRPC server in this process, on an ephemeral loopback port.

Tests talk to it only through the client library (clients/). The server is the one `python -m server
serve` builds (server.grpc_server.SwitchboardServer.create), with its own metrics registry, so
several can run in one process.
"""

from __future__ import annotations

import dataclasses
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from server.config import AdapterPoolConfig, EngineConfig, ModelConfig, ServerConfig
from server.tenants import ADMIN_TENANT, TenantDirectory, hash_key, new_key


@dataclass
class RunningServer:
    target: str  # "127.0.0.1:PORT"
    metrics_url: str  # "http://127.0.0.1:PORT/metrics"
    engine: object
    registry: object
    admin_key: str | None  # None when no tenants were given (open local mode)
    keys: dict[str, str]  # tenant -> plain API key
    server: object  # server.grpc_server.SwitchboardServer

    def client(self, tenant: str | None = ADMIN_TENANT, **kwargs):
        from clients import SwitchboardClient

        key = self.keys.get(tenant) if tenant else None
        return SwitchboardClient(self.target, api_key=key, **kwargs)

    def scrape(self) -> str:
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            return r.read().decode()


@contextmanager
def running_server(model_dir, *, tenants: dict | list | tuple | None = None, engine_cfg: EngineConfig | None = None,
                   pool_cfg: AdapterPoolConfig | None = None, data_dir: Path | None = None, quantize: bool = False,
                   tenant_limits: dict[str, int] | None = None, **server_cfg_overrides):
    """tenants: tenant names (fresh random keys) or {name: key}; the "admin" tenant is always added.
    None: open local mode (a single admin tenant "local", no key). tenant_limits: {tenant: max_concurrent}.
    Extra keywords override ServerConfig fields."""
    keys: dict[str, str] = {}
    directory = None
    if tenants is not None:
        keys = dict(tenants) if isinstance(tenants, dict) else {name: new_key() for name in tenants}
        keys.setdefault(ADMIN_TENANT, new_key())
        limits = tenant_limits or {}
        directory = TenantDirectory.from_mapping({"tenants": {
            name: {"key_sha256": hash_key(key), **({"max_concurrent": limits[name]} if name in limits else {})}
            for name, key in keys.items()}})
    from server.grpc_server import SwitchboardServer

    with tempfile.TemporaryDirectory(prefix="switchboard-test-") as tmp:
        cfg = dataclasses.replace(ServerConfig(host="127.0.0.1", port=0, metrics_port=0,
                                               data_dir=Path(data_dir or Path(tmp) / "data"), grace_period_s=2.0),
                                  **server_cfg_overrides)
        server = SwitchboardServer.create(
            ModelConfig(path=str(model_dir), quantize=quantize), engine_cfg or EngineConfig(),
            pool_cfg or AdapterPoolConfig(), cfg, tenants=directory or TenantDirectory.local())
        server.start()
        try:
            yield RunningServer(
                target=server.target, metrics_url=f"http://127.0.0.1:{server.metrics_port}/metrics",
                engine=server.engine, registry=server.registry, admin_key=keys.get(ADMIN_TENANT), keys=keys,
                server=server,
            )
        finally:
            server.stop(grace_s=cfg.grace_period_s)


def metric_values(scrape: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a /metrics scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(scrape) for s in family.samples}


def metric(scrape: str, name: str, **labels: str) -> float:
    """The sum of `name` over the samples whose labels include `labels` (0 if none)."""
    return sum(v for (n, ls), v in metric_values(scrape).items()
               if n == name and all(dict(ls).get(k) == want for k, want in labels.items()))


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"):
    """Poll `predicate()` until it returns a truthy value (returned); AssertionError after `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
