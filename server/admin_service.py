"""Admin servicer: adapter upload / list / get / delete / merge over the registry.

Every call is already authenticated by server.auth.AuthInterceptor; `caller(context)` is the Tenant.
`Tenant.act_as(requested)` gives the tenant a call acts on (PERMISSION_DENIED for a non-admin naming
another tenant). Errors map to statuses through the one table in server/status.py; a refused upload leaves nothing
behind (it is spooled and unpacked under the store's staging directory, removed on every exit).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import grpc

from server.adapters.errors import AdapterRejected, WrongBaseModel
from server.adapters.merge import MergeSpec, merge_stored
from server.adapters.peft_format import AdapterFormatError, BaseModelMismatch
from server.adapters.store import STAGING, StoreError
from server.adapters.upload import UploadRefused, UploadSpool, check_sha256, extract_adapter_tar
from server.adapters.validation import HeaderLimits, check_safetensors_stream
from server.auth import caller
from server.status import message_of, status_of
from server.upload_gate import UploadGate, UploadPacing, paced
from switchboard.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, registry, config, engine=None, metrics=None) -> None:
        self.registry = registry  # server.adapters.registry.AdapterRegistry
        self.config = config  # server.config.ServerConfig (upload size caps)
        self.engine = engine
        self.metrics = metrics
        self.gate = UploadGate(getattr(config, "max_uploads_per_tenant", 2), getattr(config, "max_uploads", 8))
        self.pacing = UploadPacing(getattr(config, "upload_idle_timeout_s", 30.0),
                                   getattr(config, "upload_min_rate", 64 << 10),
                                   getattr(config, "upload_rate_grace_s", 30.0))

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
        limits = HeaderLimits(pool.args, pool.cfg.max_lora_rank, pool.cfg.max_virtual_tokens)

        def check(stream, size: int) -> int:
            try:
                return check_safetensors_stream(stream, size, limits)
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


def _info_proto(info) -> admin_pb2.AdapterInfo:
    return admin_pb2.AdapterInfo(
        name=info.name, tenant=info.tenant, version=info.version, versions=list(info.versions), kind=info.kind,
        rank=info.rank, target_modules=list(info.target_modules), size_bytes=info.size_bytes,
        created_at=info.created_at, shared=info.shared, residency=info.residency,
    )
