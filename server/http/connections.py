"""The HTTP port's connection limits: a header-read timeout, caps on connections (total and per address) with
keyless connections lowest, and rate-limited logging of repeated errors (a flood of failed accepts).

`guarded_protocol(base, guard, header_timeout_s)` wraps uvicorn's HTTP protocol class:
- a connection must complete each request's headers within `header_timeout_s` of its first byte (of its
  opening, for the first request), else it is closed (a slowloris client trickling header lines);
- a request's body must be complete within `body_timeout_s` of its headers (a slowloris client trickling the
  body after complete headers: at the default 30 s, the 8 MiB body limit needs ~280 KB/s), else it is
  answered 408 and the connection closed (the app waiting on the body sees the client gone);
- at a cap, a new connection takes the place of the oldest one that never showed a valid key and is not
  serving a request (an idle or trickling keyless connection); with none to replace it is closed at once.
  A connection admitted over the cap is on probation: `KeyGate` answers its keyless requests 503, so a
  keyed tenant is still served while keyless connections fill the port.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


def default_max_connections() -> int:
    """4096, or half the process's file-descriptor limit when that is lower (the rest: gRPC, files, the store)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 4096 if soft == resource.RLIM_INFINITY else max(64, min(4096, soft // 2))


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_connections: int = field(default_factory=default_max_connections)  # on the port, all addresses together
    max_per_address: int = 256  # open connections from one client address
    header_timeout_s: float = 10.0  # a request's headers complete within this long of its first byte
    body_timeout_s: float = 30.0  # a request's body completes within this long of its headers
    keep_alive_s: float = 30.0  # an idle keep-alive connection is closed after this long
    max_body_bytes: int = 8 << 20  # larger bodies (declared or chunked) are refused with 413

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_per_address", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"HttpLimits.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HttpLimits.{name} must be > 0, got {getattr(self, name)}")


@dataclass(slots=True)
class _Entry:
    conn: object  # the protocol instance
    host: str
    keyed: bool = False  # one of its requests carried a valid key
    probation: bool = False  # admitted over a cap: keyless requests are refused


class ConnectionGuard:
    """Open connections by client address (event-loop thread only), oldest first."""

    def __init__(self, max_connections: int, max_per_address: int) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self._open: dict[tuple, _Entry] = {}  # client (host, port) -> entry, in arrival order
        self._per_host: Counter = Counter()
        self.refused = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, conn, client: tuple | None) -> bool:
        """Whether `conn` may stay open (making room by closing an idle keyless connection if needed)."""
        if client is None:
            return True
        host = client[0]
        host_full = self._per_host[host] >= self.max_per_address
        full = host_full or len(self._open) >= self.max_connections
        if full:
            victim = self._victim(host if host_full else None)
            if victim is None:
                self.refused += 1
                return False
            self.evicted += 1
            entry = self._open[victim]
            self.release(victim)
            entry.conn.transport.close()
        self._open[client] = _Entry(conn, host, probation=full)
        self._per_host[host] += 1
        return True

    def release(self, client: tuple | None) -> None:
        entry = self._open.pop(client, None) if client is not None else None
        if entry is not None:
            self._per_host[entry.host] -= 1
            if not self._per_host[entry.host]:
                del self._per_host[entry.host]

    def mark_keyed(self, client: tuple | None) -> None:
        entry = self._open.get(client) if client is not None else None
        if entry is not None:
            entry.keyed = True

    def on_probation(self, client: tuple | None) -> bool:
        entry = self._open.get(client) if client is not None else None
        return entry is not None and entry.probation and not entry.keyed

    def _victim(self, host: str | None) -> tuple | None:
        for client, entry in self._open.items():
            if (host is None or entry.host == host) and not entry.keyed and _idle(entry.conn):
                return client
        return None


def _idle(conn) -> bool:
    cycle = getattr(conn, "cycle", None)
    return cycle is None or cycle.response_complete


def guarded_protocol(base: type, guard: ConnectionGuard, header_timeout_s: float, body_timeout_s: float = 30.0
                     ) -> type:
    """`base` (a uvicorn HTTP protocol class) with the guard's admission, a header-read and a body-read timeout."""

    class GuardedProtocol(base):
        _header_timer = None
        _body_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if not guard.admit(self, self.client):
                transport.close()
                return
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            self._disarm_body()
            guard.release(self.client)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            super().data_received(data)
            cycle = self.cycle
            if cycle is not before:  # a request's headers are complete
                self._disarm()
                self._disarm_body()
                if _reading_body(cycle):  # its body still to come: it must be complete within body_timeout_s
                    self._body_timer = self.loop.call_later(body_timeout_s, self._body_too_slow, cycle)
            elif self._header_timer is None and _idle(self):  # the first bytes of the next request
                self._arm()
            if self._body_timer is not None and not _reading_body(cycle):
                self._disarm_body()

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _disarm_body(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def _body_too_slow(self, cycle) -> None:
            self._body_timer = None
            if cycle is not self.cycle or not _reading_body(cycle) or self.transport.is_closing():
                return
            log.debug("closing %s: the request body was not complete within %.1f s", self.client, body_timeout_s)
            if not getattr(cycle, "response_started", True):
                self.transport.write(_timeout_response(body_timeout_s))
            self.transport.close()  # the app's receive() now answers http.disconnect

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if _idle(self) and not self.transport.is_closing():
                log.debug("closing %s: no complete request headers within %.1f s", self.client, header_timeout_s)
                self.transport.close()

    return GuardedProtocol


def _reading_body(cycle) -> bool:
    """The request of `cycle` still has body bytes to come and nothing was answered yet."""
    return cycle is not None and cycle.more_body and not cycle.response_complete and not cycle.disconnected


def _timeout_response(body_timeout_s: float) -> bytes:
    body = json.dumps({"error": {
        "message": f"the request body was not complete within {body_timeout_s:g} s of its headers",
        "type": "invalid_request_error", "param": None, "code": "request_timeout"}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode() + body)


class KeyGate:
    """ASGI middleware: marks a connection keyed when its request carries a valid key; answers 503 to a keyless
    request on a connection admitted over a cap (`unavailable(scope, receive, send)` sends it)."""

    def __init__(self, app, guard: ConnectionGuard, is_valid_key, unavailable) -> None:
        self.app, self.guard, self.is_valid_key, self.unavailable = app, guard, is_valid_key, unavailable

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            client = scope.get("client")
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            if self.is_valid_key(header):
                self.guard.mark_keyed(client)
            elif self.guard.on_probation(client):
                await self.unavailable(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RateLimitFilter(logging.Filter):
    """Lets one record per message template through every `interval_s`; the next one that passes says how many
    were dropped (e.g. asyncio's "socket.accept() out of system resource", once per failed accept)."""

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._dropped: Counter = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg).split("\n", 1)[0]  # asyncio's message continues with the socket's details
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._dropped[key] += 1
            return False
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            record.msg = f"{record.msg} ({dropped} more like it in the last {self.interval_s:.0f} s not logged)"
        return True


def rate_limit_logs(logger_names: tuple[str, ...] = ("asyncio", "uvicorn.error"), interval_s: float = 10.0) -> None:
    """Install one RateLimitFilter on each named logger (idempotent)."""
    for name in logger_names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimitFilter) for f in logger.filters):
            logger.addFilter(RateLimitFilter(interval_s))
