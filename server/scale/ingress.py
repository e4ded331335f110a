"""The ingress deployment: the public gRPC services, unchanged, over the engine deployment.

It runs a SwitchboardServer (server.grpc_server: Inference + Admin + health + reflection, the auth
interceptor, quotas, usage, /metrics) whose engine is a RemoteEngine. Authentication and adapter resolution
happen here, once, against the adapter registry over the shared data directory; uploads and deletes go
through it too, and the replicas read what it committed (server.scale.shared_store). With `http_port` it
also serves the OpenAI-compatible HTTP API (server.http) over a second RemoteEngine whose failures are
OpenAI error objects.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ray import serve

from server.scale.settings import ScaleSettings

log = logging.getLogger(__name__)


@serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0})
class Ingress:
    def __init__(self, engine_deployment, settings: ScaleSettings) -> None:
        from server.adapters.registry import open_registry
        from server.grpc_server import SwitchboardServer, load_tenants
        from server.scale.remote_engine import RemoteEngine

        config = settings.server_config()
        tenants = load_tenants(config)
        self.engine = RemoteEngine(engine_deployment, settings)
        Path(config.data_dir).mkdir(parents=True, exist_ok=True)
        registry = open_registry(Path(config.data_dir), self.engine.pool, known_tenants=frozenset(tenants.tenants))
        self.server = SwitchboardServer(self.engine, registry, tenants, config)
        self.server.start()
        log.warning("switchboard ingress serving gRPC on %s", self.server.target)
        self.http = None
        if settings.http_port is not None:  # the OpenAI API: the same registry, tenants, limiter, quotas, usage
            from server.http.app import HttpServer
            from server.http.errors import from_exception

            http_engine = RemoteEngine(engine_deployment, settings, raise_as=from_exception)
            self.http = HttpServer(http_engine, registry, tenants, self.server.limiter, self.server.metrics,
                                   settings.model_id, settings.host, settings.http_port, quotas=self.server.quotas,
                                   usage=self.server.usage)
            self.http.start()
            log.warning("switchboard ingress serving the OpenAI API at %s/v1", self.http.url)

    def target(self) -> str:
        """The gRPC address the ingress listens on."""
        return self.server.target

    def http_url(self) -> str | None:
        return self.http.url if self.http is not None else None

    def failures(self) -> dict[str, int]:
        """Requests sent to another replica after theirs failed before producing a token (resubmitted), and
        streams cut after tokens (cut: the client retries those)."""
        return {"resubmitted": self.engine.resubmitted, "cut": self.engine.cut}

    def __del__(self) -> None:
        http = getattr(self, "http", None)
        if http is not None:
            http.stop(0)
        server = getattr(self, "server", None)
        if server is not None:
            server.stop(0)
