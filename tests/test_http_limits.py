"""The HTTP port's limits: bodies (chunked included) stop at the size limit with a 413 and bounded memory."""

from __future__ import annotations

import json
import socket
import threading
import tracemalloc

import pytest

from tests.http_utils import MODEL_ID, running_http_server

LIMIT = 256 << 10
CHUNK = 64 << 10


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with running_http_server(tiny_llama_dir, tenants=["acme"]) as s:
        s.http.api.max_body_bytes = LIMIT
        yield s


def _head(server, extra: str) -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {server.grpc.keys['acme']}\r\n{extra}\r\n").encode()


def _response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        got = sock.recv(65536)
        if not got:
            break
        data += got
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body[body.index(b"{"):body.rindex(b"}") + 1])


def test_a_chunked_body_over_the_limit_is_413_without_reading_it_whole(server):
    total = 64 << 20  # 64 MiB sent as chunks, 256x the limit
    sock = socket.create_connection(("127.0.0.1", server.http.port), timeout=30)
    sent = [0]

    def send() -> None:
        piece = f"{CHUNK:x}\r\n".encode() + b"x" * CHUNK + b"\r\n"
        try:
            sock.sendall(_head(server, "Transfer-Encoding: chunked\r\n"))
            while sent[0] < total:
                sock.sendall(piece)
                sent[0] += CHUNK
            sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed: it stopped reading
            pass

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        status, body = _response(sock)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        sock.close()
    sender.join(30)
    assert status == 413 and body["error"]["code"] == "request_too_large", body
    assert "limit of 262144 bytes" in body["error"]["message"]
    assert sent[0] < total  # the server closed the connection instead of draining 64 MiB
    assert peak < 16 << 20, f"peak traced memory {peak} bytes while refusing a 64 MiB body"


def test_a_declared_length_over_the_limit_is_413_before_reading(server):
    with socket.create_connection(("127.0.0.1", server.http.port), timeout=30) as sock:
        sock.sendall(_head(server, f"Content-Length: {LIMIT + 1}\r\n"))
        status, body = _response(sock)
    assert status == 413 and f"the limit is {LIMIT}" in body["error"]["message"]


def test_a_chunked_body_under_the_limit_is_served(server):
    raw = json.dumps({"model": MODEL_ID, "prompt": [5, 6, 7], "max_tokens": 2}).encode()
    with socket.create_connection(("127.0.0.1", server.http.port), timeout=30) as sock:
        chunks = b"".join(f"{len(raw[i:i + 7]):x}\r\n".encode() + raw[i:i + 7] + b"\r\n" for i in range(0, len(raw), 7))
        sock.sendall(_head(server, "Transfer-Encoding: chunked\r\n") + chunks + b"0\r\n\r\n")
        status, body = _response(sock)
    assert status == 200 and body["usage"]["completion_tokens"] == 2
