"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with OpenAI's HTTP statuses.

One table maps the exceptions the rest of the server raises to (HTTP status, error type, code, the gRPC
status name used for the shared `switchboard_requests` metric), so both protocols count alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.responses import JSONResponse

from server.status import RequestError, status_of

RETRY_AFTER_S = 1  # what a 429 / 503 asks the client to wait


@dataclass(frozen=True, slots=True)
class ErrorKind:
    status: int
    type: str
    code: str | None
    grpc_status: str  # the metrics status label, as gRPC counts the same failure


BAD_REQUEST = ErrorKind(400, "invalid_request_error", None, "INVALID_ARGUMENT")
UNAUTHORIZED = ErrorKind(401, "authentication_error", "invalid_api_key", "UNAUTHENTICATED")
FORBIDDEN = ErrorKind(403, "permission_error", "model_not_accessible", "PERMISSION_DENIED")
NOT_FOUND = ErrorKind(404, "invalid_request_error", "model_not_found", "NOT_FOUND")
ROUTE_NOT_FOUND = ErrorKind(404, "invalid_request_error", "not_found", "NOT_FOUND")
METHOD_NOT_ALLOWED = ErrorKind(405, "invalid_request_error", "method_not_allowed", "INVALID_ARGUMENT")
TOO_LARGE = ErrorKind(413, "invalid_request_error", "request_too_large", "INVALID_ARGUMENT")
CLIENT_GONE = ErrorKind(499, "invalid_request_error", "client_closed_request", "CANCELLED")  # nobody reads it
RATE_LIMITED = ErrorKind(429, "rate_limit_error", "rate_limit_exceeded", "RESOURCE_EXHAUSTED")
INTERNAL = ErrorKind(500, "server_error", "internal_error", "INTERNAL")
UNAVAILABLE = ErrorKind(503, "server_error", "service_unavailable", "UNAVAILABLE")

# the gRPC status the one exception table (server/status.py) gives an exception -> its OpenAI error kind
BY_GRPC_STATUS: dict[str, ErrorKind] = {
    "UNAUTHENTICATED": UNAUTHORIZED,
    "PERMISSION_DENIED": FORBIDDEN,
    "NOT_FOUND": NOT_FOUND,
    "INVALID_ARGUMENT": BAD_REQUEST,
    "FAILED_PRECONDITION": BAD_REQUEST,
    "RESOURCE_EXHAUSTED": RATE_LIMITED,
    "UNAVAILABLE": UNAVAILABLE,
    "INTERNAL": INTERNAL,  # a sequence the engine failed (server.lifecycle.failure)
}


class ApiError(Exception):
    def __init__(self, kind: ErrorKind, message: str, param: str | None = None, code: str | None = None,
                 retry_after: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after  # seconds, when the cause says how long (a quota); else RETRY_AFTER_S
        self.message = message
        self.param = param
        self.code = code or kind.code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        wait = self.retry_after or str(RETRY_AFTER_S)
        headers = {"Retry-After": wait} if self.kind.status in (429, 503) else None
        if self.kind.status == 413:  # the rest of the body is not read: this connection cannot be reused
            headers = {"Connection": "close"}
        return JSONResponse(self.body(), status_code=self.kind.status, headers=headers)


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(BAD_REQUEST, message, param, code)


def from_exception(exc: BaseException, param: str | None = None) -> ApiError:
    """The ApiError for a known exception; anything else is a 500 that names the exception type."""
    if isinstance(exc, ApiError):
        return exc
    message = str(exc.args[0]) if exc.args else str(exc)
    code = status_of(exc)
    kind = BY_GRPC_STATUS.get(code.name) if code is not None else None
    if kind is INTERNAL and isinstance(exc, RequestError):  # decided where it happened: its own message
        return ApiError(INTERNAL, message)
    if kind is None or kind is INTERNAL:
        return ApiError(INTERNAL, f"internal error ({type(exc).__name__}): {message}")
    named = param if kind is BAD_REQUEST else "model" if kind in (NOT_FOUND, FORBIDDEN) else None
    return ApiError(kind, message, named, retry_after=getattr(exc, "retry_after_header", None))
