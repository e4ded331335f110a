"""`running_http_server(...)`: the test gRPC server (tests/server_utils.py) plus the OpenAI HTTP API on an
ephemeral loopback port, sharing its engine, tenants, limiter and metrics, as `python -m server serve` does."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from tests.server_utils import RunningServer, running_server

MODEL_ID = "tiny-llama"


@dataclass
class RunningHttp:
    grpc: RunningServer
    http: object  # server.http.app.HttpServer
    base_url: str  # "http://127.0.0.1:PORT/v1"

    def openai(self, tenant: str | None = "admin", async_: bool = False, **kwargs):
        import openai

        key = self.grpc.keys.get(tenant) if tenant else None
        cls = openai.AsyncOpenAI if async_ else openai.OpenAI
        return cls(base_url=self.base_url, api_key=key or "none", max_retries=0, timeout=120, **kwargs)


@contextmanager
def running_http_server(model_dir, http_limits=None, **kwargs):
    """http_limits: server.http.connections.HttpLimits for the HTTP port (None: the defaults)."""
    from server.http.app import HttpServer

    with running_server(model_dir, **kwargs) as s:
        srv = s.server
        http = HttpServer(srv.engine, srv.registry, srv.tenants, srv.limiter, srv.metrics, MODEL_ID, "127.0.0.1", 0,
                          quotas=srv.quotas, usage=srv.usage, **({"limits": http_limits} if http_limits else {}))
        http.start()
        try:
            yield RunningHttp(s, http, f"{http.url}/v1")
        finally:
            http.stop(0)
