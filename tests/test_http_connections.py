"""The HTTP port's connections (server/http/connections.py): slow headers are cut at the header timeout; at the
connection cap (total or per address) keyless connections make room and are refused, a keyed tenant is
served; repeated log records (a flood of failed accepts) are rate-limited."""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest

from server.http.connections import HttpLimits, RateLimitFilter
from tests.http_utils import running_http_server
from tests.server_utils import metric, wait_until

HEADER_TIMEOUT_S = 0.6


def _closed_within(sock: socket.socket, seconds: float, trickle: bool = False) -> float | None:
    """Seconds until the server closed `sock` (None if still open after `seconds`), sending a header line
    every 0.2 s meanwhile when `trickle`."""
    start = time.monotonic()
    sock.settimeout(0.2)
    i = 0
    while time.monotonic() - start < seconds:
        try:
            if trickle:
                sock.sendall(f"X-Slow-{i}: {i}\r\n".encode())
                i += 1
            if sock.recv(4096) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except OSError:  # reset by the server
            return time.monotonic() - start
    return None


def _request(port: int, path: str, key: str | None) -> int | None:
    """The status of one GET, or None when the server closed the connection without answering."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        try:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
            data = sock.recv(65536)
        except OSError:
            return None
    return int(data.split()[1]) if data else None


def _slowloris(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        socks.append(sock)
    return socks


def test_trickled_headers_are_cut_at_the_header_timeout(tiny_llama_dir):
    with running_http_server(tiny_llama_dir, tenants=["acme"],
                             http_limits=HttpLimits(header_timeout_s=HEADER_TIMEOUT_S)) as s:
        port = s.http.port
        trickling = socket.create_connection(("127.0.0.1", port), timeout=10)
        trickling.sendall(b"GET /v1/models HTTP/1.1\r\n")
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        took = _closed_within(trickling, 5.0, trickle=True)
        assert took is not None and took < HEADER_TIMEOUT_S + 1.0, f"still open after {took} s"
        assert _closed_within(silent, 2.0) is not None  # nothing sent at all: closed too
        trickling.close()
        silent.close()
        assert _request(port, "/health", None) == 200  # a prompt client is unaffected


BODY_TIMEOUT_S = 0.8


def _answer_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> tuple[bytes, float | None]:
    """What the server sent on `sock` and the seconds until it closed it (None: still open after `seconds`),
    sending `trickle` every 0.1 s meanwhile (a slowloris body)."""
    start, got = time.monotonic(), b""
    sock.settimeout(0.1)
    while time.monotonic() - start < seconds:
        try:
            if trickle:
                sock.sendall(trickle)
            data = sock.recv(65536)
            if data == b"":
                return got, time.monotonic() - start
            got += data
        except TimeoutError:
            continue
        except OSError:  # reset by the server
            return got, time.monotonic() - start
    return got, None


@pytest.mark.timeout(120)
def test_a_body_trickled_after_complete_headers_is_cut_at_the_body_timeout(tiny_llama_dir):
    """Headers complete at once, then the body a byte at a time (declared length, or chunked): 408 and closed at
    the body timeout, the call counted as cancelled; a body sent promptly in parts, and a keep-alive connection
    idle past the timeout between requests, are unaffected."""
    with running_http_server(tiny_llama_dir, tenants=["acme"],
                             http_limits=HttpLimits(header_timeout_s=30, body_timeout_s=BODY_TIMEOUT_S)) as s:
        port, key = s.http.port, s.grpc.keys["acme"]
        body = json.dumps({"model": "tiny-llama", "prompt": [5, 6, 7], "max_tokens": 2}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                "Content-Type: application/json\r\n")
        for framing, trickle in ((f"Content-Length: {len(body) + 10_000}\r\n\r\n", b" "),
                                 ("Transfer-Encoding: chunked\r\n\r\n", b"1\r\n \r\n")):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall((head + framing).encode())
                got, took = _answer_within(sock, 6.0, trickle)
            assert took is not None and took < BODY_TIMEOUT_S + 1.5, f"{framing!r}: still open after {took} s"
            assert got.startswith(b"HTTP/1.1 408"), got[:200]
            assert json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        wait_until(lambda: s.http.api.active_calls == 0, timeout=10, what="the cut calls to close")
        scrape = s.grpc.scrape()  # counted as the client gone, not as a server error
        assert metric(scrape, "switchboard_requests_total", tenant="acme", status="CANCELLED") == 2
        assert metric(scrape, "switchboard_requests_total", status="INTERNAL") == 0
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:  # prompt parts, keep-alive
            for _ in range(2):
                sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
                time.sleep(BODY_TIMEOUT_S / 4)
                sock.sendall(body[10:])
                got = b""
                while b'"usage"' not in got:
                    got += sock.recv(65536)
                assert got.startswith(b"HTTP/1.1 200"), got[:200]
                time.sleep(BODY_TIMEOUT_S * 1.5)  # idle between requests: the body timer of the last one is off


@pytest.mark.parametrize("limits", [HttpLimits(max_connections=6, max_per_address=100, header_timeout_s=30),
                                    HttpLimits(max_connections=100, max_per_address=6, header_timeout_s=30)],
                         ids=["total", "per-address"])
def test_at_the_cap_keyless_connections_are_refused_and_a_keyed_tenant_is_served(tiny_llama_dir, limits):
    with running_http_server(tiny_llama_dir, tenants=["acme"], http_limits=limits) as s:
        port, key, guard = s.http.port, s.grpc.keys["acme"], s.http.guard
        socks: list[socket.socket] = []

        def fill() -> None:  # keyless connections up to the cap (each refusal below frees one place)
            wait_until(lambda: not any(e.keyed or e.probation for e in guard._open.values()), timeout=5,
                       what="the last request's connection closed")
            socks.extend(_slowloris(port, 6 - len(guard)))
            wait_until(lambda: len(guard) == 6, timeout=5, what="six connections open")

        try:
            for path, bad_key in (("/health", None), ("/v1/models", "sk-wrong"), ("/v1/models", None)):
                fill()  # keyless requests over the cap: refused, whatever the path
                assert _request(port, path, bad_key) in (503, None)
                fill()
                assert _request(port, "/v1/models", key) == 200  # a keyed tenant is served
            more = _slowloris(port, 20)  # a flood of new keyless connections never exceeds the cap
            socks += more
            time.sleep(0.3)
            assert len(guard) <= 6 and guard.evicted >= 20
            assert _request(port, "/v1/models", key) == 200
        finally:
            for sock in socks:
                sock.close()


def test_repeated_log_records_are_rate_limited(caplog):
    logger = logging.getLogger("switchboard-test-rate-limit")
    limiter = RateLimitFilter(interval_s=0.3)
    logger.addFilter(limiter)
    try:
        with caplog.at_level(logging.ERROR, logger=logger.name):
            for i in range(1000):
                logger.error("socket.accept() out of system resource\nsocket: <fd=%d>", i)
            logger.error("another message")
            time.sleep(0.35)
            logger.error("socket.accept() out of system resource\nsocket: <fd=1>")
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 3, messages
        assert "999 more like it" in messages[2]
    finally:
        logger.removeFilter(limiter)


def test_limits_are_checked():
    for bad in ({"max_connections": 0}, {"header_timeout_s": 0.0}, {"max_body_bytes": -1}, {"body_timeout_s": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            HttpLimits(**bad)
    assert json.dumps(HttpLimits().max_body_bytes) == str(8 << 20)
