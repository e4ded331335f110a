"""The auth interceptor: every Inference/Admin call is authenticated before its servicer runs.

The caller's Tenant reaches the servicer as `context.tenant` (the interceptor hands the servicer a
thin proxy around the real ServicerContext). Health checks and server reflection need no key, so
load balancers and grpcurl can probe the server; their *streams* (reflection, health Watch) are capped
(`OpenStreams`: in all and per peer address) and a reflection stream idle for `idle_s` is ended, so
keyless callers can never hold the workers that authenticated calls need (issue 16 item 2).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

from server.tenants import Tenant, TenantDirectory, Unauthenticated
from server.upload_gate import UploadPacing, UploadStalled, paced

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


class AuthedContext:
    """A ServicerContext plus the authenticated `tenant`; everything else is delegated."""

    def __init__(self, context: grpc.ServicerContext, tenant: Tenant) -> None:
        self._context = context
        self.tenant = tenant

    def __getattr__(self, name: str):
        return getattr(self._context, name)


def caller(context: grpc.ServicerContext) -> Tenant:
    """The authenticated tenant of a call (set by AuthInterceptor)."""
    tenant = getattr(context, "tenant", None)
    if tenant is None:  # the interceptor is not installed: refuse rather than guess
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "the call was not authenticated")
    return tenant


class OpenStreams:
    """Counts keyless streams: at most `total` at once, and `per_peer` of one peer address."""

    def __init__(self, total: int, per_peer: int | None = None, idle_s: float = 60.0) -> None:
        self.total = total
        self.per_peer = per_peer or max(1, total // 2)
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._by_peer: dict[str, int] = {}

    def open(self) -> int:
        with self._lock:
            return sum(self._by_peer.values())

    def acquire(self, peer: str) -> str | None:
        """None when admitted, else why not."""
        with self._lock:
            if sum(self._by_peer.values()) >= self.total:
                return f"{self.total} keyless streams are open; retry later"
            if self._by_peer.get(peer, 0) >= self.per_peer:
                return f"this address already holds {self.per_peer} keyless streams"
            self._by_peer[peer] = self._by_peer.get(peer, 0) + 1
            return None

    def release(self, peer: str) -> None:
        with self._lock:
            self._by_peer[peer] -= 1
            if not self._by_peer[peer]:
                del self._by_peer[peer]


def peer_address(context) -> str:
    """The caller's address without its port ("ipv4:127.0.0.1:5555" -> "ipv4:127.0.0.1")."""
    peer = context.peer() or ""
    return peer.rpartition(":")[0] if peer.count(":") >= 2 else peer


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, tenants: TenantDirectory, on_reject: Callable[[str], None] | None = None,
                 open_streams: OpenStreams | None = None) -> None:
        self.tenants = tenants
        self.on_reject = on_reject  # metrics hook: called with the method name
        self.open_streams = open_streams or OpenStreams(16)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        if method.startswith(OPEN_SERVICES):
            if handler.response_streaming:
                return _wrap(handler, self._bounded_stream(handler.request_streaming))
            return handler
        return _wrap(handler, self._authenticated(method))

    def _bounded_stream(self, request_streaming: bool):
        streams = self.open_streams

        def wrap_behavior(behavior):
            def run(request, context):
                peer = peer_address(context)
                refused = streams.acquire(peer)
                if refused is not None:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
                released = threading.Event()

                def release() -> None:
                    if not released.is_set():
                        released.set()
                        streams.release(peer)

                context.add_callback(release)  # the call ended (cancelled, deadline, done)
                try:
                    if request_streaming:  # reflection: the caller must keep asking or be let go
                        request = _idle_limited(request, streams.idle_s, context)
                    yield from behavior(request, context)
                finally:
                    release()

            return run

        return wrap_behavior

    def _authenticated(self, method: str):
        def wrap_behavior(behavior):
            def run(request, context):
                try:
                    tenant = self.tenants.authenticate(context.invocation_metadata())
                except Unauthenticated as exc:
                    if self.on_reject is not None:
                        self.on_reject(method)
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
                return behavior(request, AuthedContext(context, tenant))

            return run

        return wrap_behavior


def _idle_limited(requests, idle_s: float, context):
    try:
        yield from paced(requests, UploadPacing(idle_timeout_s=idle_s, min_rate=0, grace_s=0), size_of=lambda _: 0)
    except UploadStalled:
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"the stream sent nothing for {idle_s:g} s; closed")


def _wrap(handler: grpc.RpcMethodHandler, wrap_behavior) -> grpc.RpcMethodHandler:
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    for attr, make in kinds:
        behavior = getattr(handler, attr)
        if behavior is not None:
            return make(wrap_behavior(behavior), request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler
