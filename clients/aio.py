"""The asyncio client: the same calls as SwitchboardClient, as coroutines; stream() is an async iterator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Unpack

import grpc
import grpc.aio

from clients import messages as build
from clients.errors import Unavailable, from_rpc_error, is_cut, trim_delivered
from clients.messages import GenerateOptions
from clients.results import AdapterInfo, GenerateResult, StreamChunk, UsageReport
from clients.stubs import admin_pb2, admin_pb2_grpc, health_pb2, health_pb2_grpc, inference_pb2_grpc
from clients.sync import CHANNEL_OPTIONS


class AsyncSwitchboardClient:
    """`async with AsyncSwitchboardClient(target, api_key=...) as c: r = await c.generate("Hi")`."""

    def __init__(self, target: str = "127.0.0.1:50051", api_key: str | None = None,
                 timeout: float | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = build.auth_metadata(api_key)
        self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def _call(self, method, request, timeout: float | None = None):
        try:
            return await method(request, metadata=self._metadata, timeout=self._timeout(timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                       **options: Unpack[GenerateOptions]) -> GenerateResult:
        request = build.generate_request(prompt, **options)
        try:
            return GenerateResult.from_proto(await self._call(self._inference.Generate, request, timeout))
        except Unavailable as exc:
            if not is_cut(exc):  # a scaled-out server's replica went away: send it once more
                raise
            return GenerateResult.from_proto(await self._call(self._inference.Generate, request, timeout))

    async def stream(self, prompt: str | None = None, *, timeout: float | None = None,
                     **options: Unpack[GenerateOptions]) -> AsyncIterator[StreamChunk]:
        request = build.generate_request(prompt, **options)
        yielded = 0
        for attempt in range(2):  # one retry of a stream a scaled-out server cut (clients.errors.is_cut)
            skip = yielded  # tokens the retried stream must not yield again
            call = self._inference.GenerateStream(request, metadata=self._metadata, timeout=self._timeout(timeout))
            try:
                async for raw in call:
                    chunk, skip = trim_delivered(StreamChunk.from_proto(raw), skip)
                    if chunk is None:
                        continue
                    yielded += len(chunk.token_ids)
                    yield chunk
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if attempt or not is_cut(error):
                    raise error from None
            finally:
                call.cancel()

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        response = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def upload_adapter(self, path: str | Path, name: str, *, tenant: str = "", shared: bool = False,
                             chunk_bytes: int = 1 << 20, timeout: float | None = None) -> AdapterInfo:
        chunks = build.upload_chunks(build.adapter_payload(path), name, tenant, shared, chunk_bytes)
        return AdapterInfo.from_proto(await self._call(self._admin.UploadAdapter, chunks, timeout))

    async def list_adapters(self, tenant: str = "") -> list[AdapterInfo]:
        response = await self._call(self._admin.ListAdapters, admin_pb2.ListAdaptersRequest(tenant=tenant))
        return [AdapterInfo.from_proto(a) for a in response.adapters]

    async def get_adapter(self, name: str, tenant: str = "") -> AdapterInfo:
        return AdapterInfo.from_proto(await self._call(self._admin.GetAdapter, admin_pb2.GetAdapterRequest(
            name=name, tenant=tenant)))

    async def delete_adapter(self, name: str, tenant: str = "") -> None:
        await self._call(self._admin.DeleteAdapter, admin_pb2.DeleteAdapterRequest(name=name, tenant=tenant))

    async def merge_adapters(self, name: str, sources: list[str], *, method: str = "linear",
                       weights: list[float] | None = None, density: float | None = None,
                       target_rank: int | None = None, seed: int | None = None, shared: bool = False,
                       tenant: str = "", timeout: float | None = None) -> AdapterInfo:
        """A new stored adapter from LoRA `sources`: linear | cat | svd | ties | dare_linear | dare_ties."""
        request = build.merge_request(name, sources, method=method, weights=weights, density=density,
                                      target_rank=target_rank, seed=seed, shared=shared, tenant=tenant)
        return AdapterInfo.from_proto(await self._call(self._admin.MergeAdapters, request, timeout))

    async def get_usage(self, tenant: str = "", start: int = 0, end: int = 0) -> UsageReport:
        """Usage per tenant, adapter and minute in [start, end) unix seconds (0 = open); admin: every tenant's."""
        return UsageReport.from_proto(await self._call(self._admin.GetUsage, admin_pb2.GetUsageRequest(
            tenant=tenant, from_unix=start, to_unix=end)))

    async def reload_tenants(self) -> list[str]:
        """Admin: the server re-reads its tenants file; the tenants now in force."""
        return list((await self._call(self._admin.ReloadTenants, admin_pb2.ReloadTenantsRequest())).tenants)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncSwitchboardClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
