"""Admin servicer: adapter upload / list / get / delete / merge over the registry; usage; tenants reload.

Every call is already authenticated by server.auth.AuthInterceptor; `caller(context)` is the Tenant.
`Tenant.act_as(requested)` gives the tenant a call acts on (PERMISSION_DENIED for a non-admin naming
another tenant). Errors map to statuses through the one table in server/status.py; a refused upload leaves nothing
behind (it is spooled and unpacked under the store's staging directory, removed on every exit).
A new stored adapter (upload or merge) is refused over the owner's max_adapters / max_adapter_bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import grpc

from server.adapters.errors import AdapterRejected, WrongBaseModel
from server.adapters.merge import MergeSpec, merge_stored
from server.adapters.peft_format import AdapterFormatError, BaseModelMismatch
from server.adapters.store import STAGING, StoreError
from server.adapters.upload import UploadRefused, UploadSpool, check_sha256, extract_adapter_tar
from server.adapters.validation import check_safetensors_stream
from server.auth import caller
from server.quotas import TenantLimits, check_storage
from server.status import message_of, status_of
from server.tenants import TenantPermissionDenied, TenantsFileError
from server.upload_gate import UploadGate, UploadPacing, paced
from switchboard.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, registry, config, engine=None, metrics=None, usage=None, tenants=None,
                 reload: Callable[[], list[str]] | None = None) -> None:
        # server.adapters.registry.AdapterRegistry, its create() under the owner's storage limits
        self.registry = None if registry is None else StorageQuota(registry, self._limits_of)
        self.config = config  # server.config.ServerConfig (upload size caps)
        self.engine = engine
        self.metrics = metrics
        self.gate = UploadGate(getattr(config, "max_uploads_per_tenant", 2), getattr(config, "max_uploads", 8))
        self.pacing = UploadPacing(getattr(config, "upload_idle_timeout_s", 30.0),
                                   getattr(config, "upload_min_rate", 64 << 10),
                                   getattr(config, "upload_rate_grace_s", 30.0))
        self.usage = usage  # server.usage.UsageRecorder, or None (no accounting)
        self.tenants = tenants  # server.tenants.TenantDirectory (limits by tenant name)
        self.reload = reload  # re-reads the tenants file; None = there is none

    def _limits_of(self, tenant: str) -> TenantLimits:
        found = self.tenants.by_name(tenant) if self.tenants is not None else None
        return found.limits if found is not None else TenantLimits()

    @contextmanager
    def _errors(self, context: grpc.ServicerContext, what: str):
        """Turn our exceptions into gRPC statuses with their messages."""
        if self.registry is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this server has no adapter store")
        try:
            yield
        except Exception as exc:  # the status table first: PermissionError is an OSError too
            code = status_of(exc)
            if code is not None:
                context.abort(code, message_of(exc))
            if not isinstance(exc, StoreError | OSError):
                raise
            log.exception("%s failed", what)
            context.abort(grpc.StatusCode.INTERNAL, f"{what} failed in the adapter store: {exc}")

    def _who(self, context: grpc.ServicerContext, requested: str):
        """The tenant a call acts as: the caller itself (keeps its admin right) or, for admins, another one."""
        me = caller(context)
        acting = me.act_as(requested)
        return me if acting == me.name else acting

    # ---- RPCs ----------------------------------------------------------------------------------
    def UploadAdapter(self, request_iterator, context):
        with self._errors(context, "the upload"):
            chunks = iter(request_iterator)
            first = next(chunks, None)
            if first is None:
                raise UploadRefused("the upload stream is empty: the first chunk must carry the metadata")
            if not first.HasField("metadata"):
                raise UploadRefused("the first upload chunk must carry the metadata (name, sha256, ...)")
            meta = first.metadata
            who = self._who(context, meta.tenant)
            if not meta.name:
                raise UploadRefused("the metadata has no adapter name")
            sha = check_sha256(meta.sha256)
            cfg = self.config
            staging = self.registry.store.root / STAGING
            with self.gate.admit(caller(context).name), \
                    UploadSpool(staging, max_bytes=cfg.max_upload_bytes, max_chunk_bytes=cfg.max_upload_chunk_bytes,
                                expected_bytes=meta.total_bytes or None) as spool:
                for chunk in paced(chunks, self.pacing):
                    if chunk.HasField("metadata"):
                        raise UploadRefused("metadata may only come in the first chunk")
                    spool.write(chunk.data)
                payload = spool.finish(sha)
                src = extract_adapter_tar(payload, spool.dir / "adapter", max_bytes=cfg.max_upload_bytes,
                                          check_weights=self._weights_check())
                info = self.registry.create(who, meta.name, src, shared=meta.shared)
            log.info("adapter %s/%s version %d uploaded", info.tenant, info.name, info.version)
            return _info_proto(info)

    def _weights_check(self):
        """The safetensors header check against the loaded base, run while the tar streams (None: no engine)."""
        pool = getattr(self.engine, "pool", None)
        if pool is None:
            return None
        args, limits = pool.args, pool.limits  # the loaded base; the pool's one AdapterLimits

        def check(stream, size: int) -> int:
            try:
                return check_safetensors_stream(stream, size, args, limits)
            except BaseModelMismatch as exc:
                raise WrongBaseModel(f"the adapter does not fit the loaded base model: {exc}") from None
            except AdapterFormatError as exc:
                raise AdapterRejected(str(exc)) from None

        return check

    def ListAdapters(self, request: admin_pb2.ListAdaptersRequest, context):
        with self._errors(context, "listing adapters"):
            me = caller(context)
            who = self._who(context, request.tenant)
            everything = who is me and me.is_admin
            infos = self.registry.list(None if everything else who)
            return admin_pb2.ListAdaptersResponse(adapters=[_info_proto(i) for i in infos])

    def GetAdapter(self, request: admin_pb2.GetAdapterRequest, context):
        with self._errors(context, "reading the adapter"):
            return _info_proto(self.registry.get(self._who(context, request.tenant), request.name))

    def DeleteAdapter(self, request: admin_pb2.DeleteAdapterRequest, context):
        with self._errors(context, "deleting the adapter"):
            self.registry.delete(self._who(context, request.tenant), request.name)
            return admin_pb2.DeleteAdapterResponse()

    def MergeAdapters(self, request: admin_pb2.MergeRequest, context):
        with self._errors(context, "the merge"):
            who = self._who(context, request.tenant)
            spec = MergeSpec(
                method=request.method or "linear",
                weights=tuple(request.weights) if len(request.weights) else None,
                density=request.density if request.HasField("density") else None,
                target_rank=request.target_rank if request.HasField("target_rank") else None,
                seed=request.seed if request.HasField("seed") else None,
            )
            if not request.name:
                raise AdapterRejected("the merged adapter needs a name")
            info = merge_stored(self.registry, who, request.name, list(request.sources), spec,
                                shared=request.shared)
            return _info_proto(info)


    def GetUsage(self, request: admin_pb2.GetUsageRequest, context):
        if self.usage is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this server keeps no usage records")
        me = caller(context)
        try:
            acting = me.act_as(request.tenant)
        except TenantPermissionDenied as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        if request.from_unix < 0 or request.to_unix < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "from_unix and to_unix must be >= 0 (0 = open)")
        everyone = me.is_admin and not request.tenant
        rows = self.usage.query(None if everyone else acting, request.from_unix or None, request.to_unix or None)
        return admin_pb2.GetUsageResponse(
            rows=[admin_pb2.UsageRow(tenant=r.tenant, adapter=r.adapter, minute=r.minute, prompt_tokens=r.prompt_tokens,
                                     completion_tokens=r.completion_tokens, requests=r.requests,
                                     cached_prompt_tokens=r.cached_prompt_tokens) for r in rows],
            prompt_tokens=sum(r.prompt_tokens for r in rows), completion_tokens=sum(r.completion_tokens for r in rows),
            requests=sum(r.requests for r in rows), cached_prompt_tokens=sum(r.cached_prompt_tokens for r in rows))

    def ReloadTenants(self, request: admin_pb2.ReloadTenantsRequest, context):
        if not caller(context).is_admin:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "only the admin tenant may reload the tenants file")
        if self.reload is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this server runs without a tenants file")
        try:
            names = self.reload()
        except TenantsFileError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"the tenants file was refused, the old one stays in "
                          f"force: {exc}")
        return admin_pb2.ReloadTenantsResponse(tenants=names)


class StorageQuota:
    """The registry, its create() refused over the owner's max_adapters / max_adapter_bytes (uploads and merges
    both store through create). Two creates racing past the check may both pass: a soft limit by one adapter."""

    def __init__(self, registry, limits_of: Callable[[str], TenantLimits]) -> None:
        self._registry = registry
        self._limits_of = limits_of

    def __getattr__(self, name: str):
        return getattr(self._registry, name)

    def create(self, tenant, name: str, src_dir: Path, *, shared: bool = False):
        me = getattr(tenant, "name", tenant)
        owner, short = name.split("/", 1) if "/" in name else (me, name)
        limits = self._limits_of(owner)
        if limits.max_adapters is not None or limits.max_adapter_bytes is not None:
            size = sum(f.stat().st_size for f in Path(src_dir).rglob("*") if f.is_file())
            own = [a for a in self._registry.list(None) if a.tenant == owner]
            check_storage(owner, limits, own, short, size)
        return self._registry.create(tenant, name, src_dir, shared=shared)


def _info_proto(info) -> admin_pb2.AdapterInfo:
    return admin_pb2.AdapterInfo(
        name=info.name, tenant=info.tenant, version=info.version, versions=list(info.versions), kind=info.kind,
        rank=info.rank, target_modules=list(info.target_modules), size_bytes=info.size_bytes,
        created_at=info.created_at, shared=info.shared, residency=info.residency,
    )
