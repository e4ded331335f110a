"""The Starlette app and `HttpServer`: uvicorn on its own thread and event loop, in the gRPC server's process.

`HttpServer(engine, registry, tenants, limiter, metrics, model_id, host, port)` shares everything with the
gRPC server (one engine, one tenants directory, one per-tenant concurrency limiter, one metrics registry).
start() binds (port 0 = any free port; `.port` is the bound one); stop(grace) answers 503 to new requests,
lets in-flight ones finish for up to `grace` seconds, then closes the server.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import Route
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from server.http.connections import ConnectionGuard, HttpLimits, KeyGate, guarded_protocol, rate_limit_logs
from server.http.errors import INTERNAL, METHOD_NOT_ALLOWED, ROUTE_NOT_FOUND, UNAVAILABLE, ApiError, ErrorKind
from server.http.openapi import document
from server.http.routes import OpenAIApi
from server.tenants import Unauthenticated

log = logging.getLogger(__name__)


def build_app(api: OpenAIApi, guard: ConnectionGuard | None = None):
    """The Starlette app; with a guard, behind its KeyGate (keyless requests of over-cap connections: 503)."""
    app = _routes_app(api)
    if guard is None:
        return app

    def is_valid_key(header: str | None) -> bool:
        try:
            api.tenants.authenticate([("authorization", header)] if header is not None else [])
        except Unauthenticated:
            return False
        return True

    async def unavailable(scope, receive, send) -> None:
        response = ApiError(UNAVAILABLE, "the HTTP port is at its connection limit; requests without a valid API "
                            "key are refused until connections close").response()
        response.headers["Connection"] = "close"
        await response(scope, receive, send)

    return KeyGate(app, guard, is_valid_key, unavailable)


def _routes_app(api: OpenAIApi) -> Starlette:
    routes = [
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/openapi.json", openapi_route(api), methods=["GET"]),
    ]

    async def http_error(request, exc: HTTPException):
        kind = {404: ROUTE_NOT_FOUND, 405: METHOD_NOT_ALLOWED}.get(exc.status_code)
        kind = kind or ErrorKind(exc.status_code, "invalid_request_error", None, "INVALID_ARGUMENT")
        return ApiError(kind, f"{request.method} {request.url.path}: {exc.detail}").response()

    async def crash(request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return ApiError(INTERNAL, f"internal error ({type(exc).__name__})").response()

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: crash})


def openapi_route(api: OpenAIApi):
    doc = document(api.model_id, api.engine.config.max_new_tokens_limit)

    async def openapi(request) -> JSONResponse:
        return JSONResponse(doc)

    return openapi


class HttpServer:
    def __init__(self, engine, registry, tenants, limiter, metrics, model_id: str, host: str = "127.0.0.1",
                 port: int = 8000, quotas=None, usage=None, limits: HttpLimits | None = None) -> None:
        self.api = OpenAIApi(engine, registry, tenants, limiter, metrics, model_id, quotas, usage)
        self.limits = limits or HttpLimits()
        self.api.max_body_bytes = self.limits.max_body_bytes
        self.guard = ConnectionGuard(self.limits.max_connections, self.limits.max_per_address)
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {self.host}:{self.requested_port} (HTTP): {exc}") from None
        sock.listen(2048)
        self.port = sock.getsockname()[1]
        rate_limit_logs()  # a flood of failed accepts (out of file descriptors) logs once per interval
        protocol = guarded_protocol(AutoHTTPProtocol, self.guard, self.limits.header_timeout_s,
                                    self.limits.body_timeout_s)
        config = uvicorn.Config(build_app(self.api, self.guard), log_level="warning", lifespan="off",
                                access_log=False, http=protocol, timeout_keep_alive=self.limits.keep_alive_s,
                                backlog=2048)
        self._server = uvicorn.Server(config)
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            try:
                loop.run_until_complete(self._server.serve(sockets=[sock]))
            finally:
                loop.close()
                sock.close()

        self._thread = threading.Thread(target=run, name="http-server", daemon=True)
        self._thread.start()
        started.wait(10)
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.01)

    def begin_drain(self) -> None:
        """New generation requests get 503 (with Retry-After) from now on; in-flight ones continue."""
        self.api.draining = True

    def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.api.active_calls > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.api.active_calls == 0

    def stop(self, grace_s: float = 0.0) -> None:
        self.begin_drain()
        self.wait_idle(grace_s)
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = grace_s <= 0
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, grace_s + 5.0))
        self._thread = None
