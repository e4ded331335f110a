"""gRPC errors as typed exceptions: `except NotFound:` instead of inspecting status codes."""

from __future__ import annotations

import dataclasses

import grpc


class SwitchboardError(Exception):
    """A call failed; `code` is the gRPC status code, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s  # the server's `retry-after` hint (quotas), seconds


class Unauthenticated(SwitchboardError): ...


class PermissionDenied(SwitchboardError): ...


class NotFound(SwitchboardError): ...


class InvalidArgument(SwitchboardError): ...


class FailedPrecondition(SwitchboardError): ...


class ResourceExhausted(SwitchboardError): ...


class DeadlineExceeded(SwitchboardError): ...


class Cancelled(SwitchboardError): ...


class Unavailable(SwitchboardError): ...


_BY_CODE: dict[grpc.StatusCode, type[SwitchboardError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def from_rpc_error(exc: grpc.RpcError) -> SwitchboardError:
    """The typed exception for a grpc.RpcError (sync or aio)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    code = code or grpc.StatusCode.UNKNOWN
    return _BY_CODE.get(code, SwitchboardError)(code, details or code.name, _retry_after(exc))


def _retry_after(exc: grpc.RpcError) -> float | None:
    """The `retry-after` trailing metadata (seconds) of a failed call, if the server sent one."""
    try:
        trailing = exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else None
        value = next((v for k, v in trailing or () if k == "retry-after"), None)
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


# A scaled-out server (server.scale) ends a stream whose replica died mid-way with UNAVAILABLE and this text.
CUT_MARKER = "retry the request"


def is_cut(error: SwitchboardError) -> bool:
    """UNAVAILABLE that says the request may be sent again (its replica went away); the client retries once."""
    return error.code == grpc.StatusCode.UNAVAILABLE and CUT_MARKER in error.message


def trim_delivered(chunk, delivered: int):
    """One chunk of a retried stream against the `delivered` tokens it must still skip: (the chunk to yield, or
    None, and the tokens still to skip). Exact for greedy or seeded sampling, which give the same tokens again; a
    chunk that straddles the boundary keeps its tokens after it and drops its text (its characters cannot be split
    by token here)."""
    if delivered <= 0:
        return chunk, 0
    n = len(chunk.token_ids)
    if n <= delivered and not chunk.finished:
        return None, delivered - n
    keep = chunk.token_ids[delivered:] if n > delivered else []
    return dataclasses.replace(chunk, token_ids=keep, text="",
                               logprobs=chunk.logprobs[len(chunk.logprobs) - len(keep):] if keep else []), 0


def skip_delivered(chunks, delivered: int):
    """A retried stream without its first `delivered` tokens (those were yielded before the cut): trim_delivered
    over every chunk."""
    for chunk in chunks:
        kept, delivered = trim_delivered(chunk, delivered)
        if kept is not None:
            yield kept
