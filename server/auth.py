"""The auth interceptor: every Inference/Admin call is authenticated before its servicer runs.

The caller's Tenant reaches the servicer as `context.tenant` (the interceptor hands the servicer a
thin proxy around the real ServicerContext). Health checks and server reflection need no key, so
load balancers and grpcurl can probe the server.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from server.tenants import Tenant, TenantDirectory, Unauthenticated

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


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, tenants: TenantDirectory, on_reject: Callable[[str], None] | None = None) -> None:
        self.tenants = tenants
        self.on_reject = on_reject  # metrics hook: called with the method name

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        return _wrap(handler, self._authenticated(method))

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
