"""Admin servicer: adapter upload / list / get / delete / merge (issue 5 fills the RPCs in).

Every call is already authenticated by server.auth.AuthInterceptor; `caller(context)` is the Tenant.
`Tenant.act_as(requested)` gives the tenant a call acts on (PERMISSION_DENIED for a non-admin naming
another tenant).
"""

from __future__ import annotations

import grpc

from server.auth import caller
from server.tenants import TenantPermissionDenied
from switchboard.v1 import admin_pb2, admin_pb2_grpc


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, registry, config, engine=None, metrics=None) -> None:
        self.registry = registry  # server.adapters.registry.AdapterRegistry
        self.config = config  # server.config.ServerConfig (upload size caps)
        self.engine = engine
        self.metrics = metrics

    def _acting_tenant(self, context: grpc.ServicerContext, requested: str) -> str:
        try:
            return caller(context).act_as(requested)
        except TenantPermissionDenied as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))

    def _unimplemented(self, context: grpc.ServicerContext, what: str):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not implemented yet")

    def UploadAdapter(self, request_iterator, context):
        first = next(iter(request_iterator), None)
        if first is None or not first.HasField("metadata"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first upload chunk must carry the metadata")
        self._acting_tenant(context, first.metadata.tenant)
        self._unimplemented(context, "UploadAdapter")

    def ListAdapters(self, request: admin_pb2.ListAdaptersRequest, context):
        self._acting_tenant(context, request.tenant)
        self._unimplemented(context, "ListAdapters")

    def GetAdapter(self, request: admin_pb2.GetAdapterRequest, context):
        self._acting_tenant(context, request.tenant)
        self._unimplemented(context, "GetAdapter")

    def DeleteAdapter(self, request: admin_pb2.DeleteAdapterRequest, context):
        self._acting_tenant(context, request.tenant)
        self._unimplemented(context, "DeleteAdapter")

    def MergeAdapters(self, request: admin_pb2.MergeRequest, context):
        self._acting_tenant(context, request.tenant)
        self._unimplemented(context, "MergeAdapters")
