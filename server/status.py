"""One table from our exceptions to gRPC status codes, for the Inference and Admin services alike.

Most specific class first: the first row whose class the exception is an instance of decides. An
exception in no row is a bug, not a status (it propagates, gRPC answers UNKNOWN and it is logged).
"""

from __future__ import annotations

import grpc

from server.adapters.errors import AdapterForbidden, AdapterNotFound, AdapterRejected, WrongBaseModel
from server.adapters.upload import UploadTooLarge
from server.engine.request import EngineStopped, InvalidRequest, QueueFull, UnknownAdapterRequest
from server.quotas import QuotaExceeded
from server.tenants import TenantBusy, TenantPermissionDenied, Unauthenticated
from server.upload_gate import UploadBusy, UploadStalled

Code = grpc.StatusCode


class RequestError(Exception):
    """A status decided where the problem was found (validation, a failed or aborted sequence)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(Code.INVALID_ARGUMENT, message)


STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (Unauthenticated, Code.UNAUTHENTICATED),  # (gRPC refuses these in its auth interceptor already)
    (UnknownAdapterRequest, Code.NOT_FOUND),  # an InvalidRequest naming an adapter deleted since it resolved
    (UploadTooLarge, Code.RESOURCE_EXHAUSTED),
    (UploadBusy, Code.RESOURCE_EXHAUSTED),  # the tenant's (or the server's) concurrent uploads
    (UploadStalled, Code.DEADLINE_EXCEEDED),  # an upload idle or slower than the minimum rate
    (WrongBaseModel, Code.FAILED_PRECONDITION),
    (AdapterRejected, Code.INVALID_ARGUMENT),
    (AdapterNotFound, Code.NOT_FOUND),
    (AdapterForbidden, Code.PERMISSION_DENIED),
    (TenantPermissionDenied, Code.PERMISSION_DENIED),
    (TenantBusy, Code.RESOURCE_EXHAUSTED),
    (QuotaExceeded, Code.RESOURCE_EXHAUSTED),  # tokens/requests per minute, stored adapters/bytes
    (QueueFull, Code.RESOURCE_EXHAUSTED),
    (EngineStopped, Code.UNAVAILABLE),
    (InvalidRequest, Code.INVALID_ARGUMENT),
)


def status_of(exc: BaseException) -> grpc.StatusCode | None:
    if isinstance(exc, RequestError):
        return exc.code
    return next((code for cls, code in STATUS_TABLE if isinstance(exc, cls)), None)


def message_of(exc: BaseException) -> str:
    """The exception's own message (a KeyError's str() would add quotes)."""
    if isinstance(exc, RequestError):
        return exc.message
    return str(exc.args[0]) if exc.args else str(exc)
