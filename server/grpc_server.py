"""Assemble the gRPC server: Inference + Admin servicers, auth interceptor, health, reflection, /metrics.

`SwitchboardServer.create(...)` loads the model, opens the adapter store and wires everything; both
`python -m server serve` and the test harness (tests/server_utils.py) use it, so they cannot drift.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.admin_service import AdminServicer
from server.auth import AuthInterceptor, OpenStreams
from server.config import AdapterPoolConfig, ConfigError, EngineConfig, ModelConfig, ServerConfig
from server.metrics import ServerMetrics
from server.quotas import Quotas
from server.service import InferenceServicer
from server.tenants import ConcurrencyLimiter, TenantDirectory
from server.usage import UsageRecorder
from switchboard.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_tenants(config: ServerConfig) -> TenantDirectory:
    """The tenants file, or the single local tenant on a loopback address; refuses an open public bind."""
    if config.tenants_file is not None:
        return TenantDirectory.from_file(config.tenants_file)
    if not is_loopback(config.host):
        raise ConfigError(
            f"refusing to listen on {config.host!r} without a tenants file: anyone could call the server. "
            "Pass --tenants FILE (see `python -m server.tenants new NAME`) or bind 127.0.0.1."
        )
    log.warning("no tenants file: every caller on %s is the local tenant (admin rights, no API key)", config.host)
    return TenantDirectory.local()


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class SwitchboardServer:
    """One gRPC server over one engine. start() binds; stop(grace) drains in-flight calls."""

    def __init__(self, engine, registry, tenants: TenantDirectory, config: ServerConfig) -> None:
        self.engine = engine
        self.registry = registry
        self.tenants = tenants
        self.config = config
        waiting = engine.scheduler.waiting  # the fairness queue: tenant weights in, per-tenant service out
        waiting.set_weights(tenants.weights())
        self.metrics = ServerMetrics(engine.stats, fairness=waiting.snapshot)
        self.quotas = Quotas()
        self.usage = UsageRecorder(Path(config.data_dir) / "usage.sqlite")
        self._reload_lock = threading.Lock()
        self.limiter = ConcurrencyLimiter(config.per_tenant_concurrency)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.port: int | None = None
        self._stopping = threading.Event()
        self.metrics_port: int | None = None
        message_cap = config.max_upload_chunk_bytes + (64 << 10)
        # keyless streams (reflection, health Watch) get a small share of the workers, never all of them
        self.open_streams = OpenStreams(config.max_open_streams, idle_s=config.open_stream_idle_s)
        # a generation holds a worker thread from arrival to its last token: enough workers for every
        # sequence the engine may hold (running + waiting) plus admin/health calls, so the engine's
        # bounded queue (with its clear RESOURCE_EXHAUSTED message) is the limit callers meet first
        workers = max(config.grpc_workers, engine.config.max_running + engine.config.max_waiting + 16)
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc-worker"),
            interceptors=[AuthInterceptor(tenants, on_reject=self.metrics.observe_unauthenticated,
                                          open_streams=self.open_streams)],
            maximum_concurrent_rpcs=workers,
            options=[("grpc.max_receive_message_length", message_cap), ("grpc.so_reuseport", 0)],
        )
        inference_pb2_grpc.add_InferenceServicer_to_server(
            InferenceServicer(engine, registry, self.limiter, self.metrics, quotas=self.quotas, usage=self.usage),
            self._server)
        self.admin = AdminServicer(registry=registry, config=config, engine=engine, metrics=self.metrics,
                                   usage=self.usage, tenants=tenants,
                                   reload=self.reload_tenants if config.tenants_file else None)
        admin_pb2_grpc.add_AdminServicer_to_server(self.admin, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self._server)

    @classmethod
    def create(cls, model_cfg: ModelConfig, engine_cfg: EngineConfig, pool_cfg: AdapterPoolConfig,
               config: ServerConfig, tenants: TenantDirectory | None = None) -> SwitchboardServer:
        """Load the model, open the adapter store under `config.data_dir`, and build the server (not started)."""
        from server.adapters.registry import open_registry
        from server.engine.engine import Engine

        tenants = tenants or load_tenants(config)
        engine = Engine.create(model_cfg, engine_cfg, pool_cfg)
        try:
            Path(config.data_dir).mkdir(parents=True, exist_ok=True)
            registry = open_registry(Path(config.data_dir), engine.pool, known_tenants=frozenset(tenants.tenants))
        except Exception:
            _close_pool(engine)
            raise
        return cls(engine, registry, tenants, config)

    def reload_tenants(self) -> list[str]:
        """Re-read the tenants file (SIGHUP, Admin.ReloadTenants): new keys, weights and quotas apply to calls
        from now on; running requests keep theirs. Raises TenantsFileError (the old file stays in force)."""
        if self.config.tenants_file is None:
            from server.tenants import TenantsFileError

            raise TenantsFileError("the server runs without a tenants file")
        with self._reload_lock:
            fresh = TenantDirectory.from_file(self.config.tenants_file)
            self.tenants.replace_with(fresh)
            self.engine.scheduler.waiting.set_weights(fresh.weights())
        log.warning("tenants file %s reloaded: %s", self.config.tenants_file, ", ".join(fresh.tenants))
        return list(fresh.tenants)

    @property
    def target(self) -> str:
        return host_port(self.config.host, self.port)

    def start(self) -> None:
        """Start the engine loop, bind the gRPC and metrics ports, and report SERVING."""
        self.engine.start()
        try:
            self.port = self._server.add_insecure_port(host_port(self.config.host, self.config.port))
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {host_port(self.config.host, self.config.port)}: {exc}") from None
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_host, self.config.metrics_port)
        self._server.start()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        threading.Thread(target=self._watch_engine, name="engine-watchdog", daemon=True).start()

    def _set_health(self, status) -> None:
        for service in ("", *SERVICE_NAMES):
            self.health.set(service, status)

    def _watch_engine(self, interval_s: float = 0.5) -> None:
        """Report NOT_SERVING once the engine's step loop is gone, so health checks (Docker, k8s) see it."""
        while not self._stopping.wait(interval_s):
            if not self.engine.alive:
                log.error("the engine's step loop is not running: reporting NOT_SERVING")
                self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
                return

    def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish for `grace_s`, then cancel the rest."""
        grace_s = self.config.grace_period_s if grace_s is None else grace_s
        self._stopping.set()
        self.health.enter_graceful_shutdown()
        self._server.stop(grace_s).wait()
        self.engine.shutdown(drain_timeout_s=0.0)
        _close_pool(self.engine)
        self.metrics.stop()
        self.usage.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)


def _close_pool(engine) -> None:
    close = getattr(engine.pool, "close", None)
    if close is not None:
        close()
