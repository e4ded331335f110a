"""The synchronous client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Unpack

import grpc

from clients import messages as build
from clients.errors import Unavailable, from_rpc_error, is_cut, skip_delivered
from clients.messages import GenerateOptions
from clients.results import AdapterInfo, GenerateResult, StreamChunk, UsageReport
from clients.stubs import admin_pb2, admin_pb2_grpc, health_pb2, health_pb2_grpc, inference_pb2_grpc

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class SwitchboardClient:
    """`with SwitchboardClient("127.0.0.1:50051", api_key=...) as c: c.generate("Hi")`.

    Every failed call raises a `clients.errors.SwitchboardError` subclass (NotFound, InvalidArgument, ...).
    `timeout` (seconds) is the default deadline of each call; per-call `timeout=` overrides it.
    """

    def __init__(self, target: str = "127.0.0.1:50051", api_key: str | None = None,
                 timeout: float | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = build.auth_metadata(api_key)
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, metadata=self._metadata, timeout=self._timeout(timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    # ---- inference -----------------------------------------------------------------------------
    def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                 **options: Unpack[GenerateOptions]) -> GenerateResult:
        """The whole completion (options: clients.messages.GenerateOptions)."""
        request = build.generate_request(prompt, **options)
        try:
            return GenerateResult.from_proto(self._call(self._inference.Generate, request, timeout))
        except Unavailable as exc:
            if not is_cut(exc):
                raise
            return GenerateResult.from_proto(self._call(self._inference.Generate, request, timeout))  # once

    def stream(self, prompt: str | None = None, *, timeout: float | None = None,
               **options: Unpack[GenerateOptions]) -> Iterator[StreamChunk]:
        """Chunks as they are generated; the last has finished=True. Closing the iterator cancels the call."""
        request = build.generate_request(prompt, **options)
        delivered = 0  # tokens already yielded: a retried stream skips them (see clients.errors.is_cut)
        for attempt in range(2):
            call = self._inference.GenerateStream(request, metadata=self._metadata, timeout=self._timeout(timeout))
            try:
                for chunk in skip_delivered((StreamChunk.from_proto(c) for c in call), delivered):
                    delivered += len(chunk.token_ids)
                    yield chunk
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if attempt or not is_cut(error):
                    raise error from None
            finally:
                call.cancel()  # no-op when the stream already ended

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """"SERVING" / "NOT_SERVING" (grpc.health.v1; needs no API key)."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # ---- admin ---------------------------------------------------------------------------------
    def upload_adapter(self, path: str | Path, name: str, *, tenant: str = "", shared: bool = False,
                       chunk_bytes: int = 1 << 20, timeout: float | None = None) -> AdapterInfo:
        """Upload a PEFT directory (tarred on the fly) or a .tar; a new version if `name` exists."""
        chunks = build.upload_chunks(build.adapter_payload(path), name, tenant, shared, chunk_bytes)
        return AdapterInfo.from_proto(self._call(self._admin.UploadAdapter, chunks, timeout))

    def list_adapters(self, tenant: str = "") -> list[AdapterInfo]:
        response = self._call(self._admin.ListAdapters, admin_pb2.ListAdaptersRequest(tenant=tenant))
        return [AdapterInfo.from_proto(a) for a in response.adapters]

    def get_adapter(self, name: str, tenant: str = "") -> AdapterInfo:
        return AdapterInfo.from_proto(self._call(self._admin.GetAdapter, admin_pb2.GetAdapterRequest(
            name=name, tenant=tenant)))

    def delete_adapter(self, name: str, tenant: str = "") -> None:
        self._call(self._admin.DeleteAdapter, admin_pb2.DeleteAdapterRequest(name=name, tenant=tenant))

    def merge_adapters(self, name: str, sources: list[str], *, method: str = "linear",
                       weights: list[float] | None = None, density: float | None = None,
                       target_rank: int | None = None, seed: int | None = None, shared: bool = False,
                       tenant: str = "", timeout: float | None = None) -> AdapterInfo:
        """A new stored adapter from LoRA `sources`: linear | cat | svd | ties | dare_linear | dare_ties."""
        request = build.merge_request(name, sources, method=method, weights=weights, density=density,
                                      target_rank=target_rank, seed=seed, shared=shared, tenant=tenant)
        return AdapterInfo.from_proto(self._call(self._admin.MergeAdapters, request, timeout))

    def get_usage(self, tenant: str = "", start: int = 0, end: int = 0) -> UsageReport:
        """Usage per tenant, adapter and minute in [start, end) unix seconds (0 = open); admin: every tenant's."""
        return UsageReport.from_proto(self._call(self._admin.GetUsage, admin_pb2.GetUsageRequest(
            tenant=tenant, from_unix=start, to_unix=end)))

    def reload_tenants(self) -> list[str]:
        """Admin: the server re-reads its tenants file; the tenants now in force."""
        return list(self._call(self._admin.ReloadTenants, admin_pb2.ReloadTenantsRequest()).tenants)

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SwitchboardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
