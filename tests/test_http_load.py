"""Many HTTP streams at once: 64 concurrent streaming clients complete with the right text; 20 clients that
disconnect mid-stream leave no sequence running and KV use at 0 in /metrics."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest

from tests.http_utils import MODEL_ID, running_http_server
from tests.server_utils import metric, wait_until

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with running_http_server(tiny_llama_dir, tenants=["acme"]) as s:
        yield s


def test_64_concurrent_streaming_clients(server):
    n = 64
    prompts = [[5 + i % 50, 6 + i % 7, 7 + i % 11] for i in range(n)]

    async def main():
        c = server.openai("acme", async_=True)

        async def one(i: int):
            stream = await c.completions.create(model=MODEL_ID, prompt=prompts[i], max_tokens=16, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True})
            text, usage, finish = [], None, None
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for ch in chunk.choices:
                    text.append(ch.text)
                    finish = ch.finish_reason or finish
            return "".join(text), usage, finish

        results = await asyncio.gather(*(one(i) for i in range(n)))
        await c.close()
        return results

    results = asyncio.run(main())
    with server.grpc.client("acme", timeout=60) as g:
        for i in (0, 17, 63):  # spot-check against the gRPC path (greedy: batch-independent)
            assert results[i][0] == g.generate(token_ids=prompts[i], max_new_tokens=16, ignore_eos=True).text
    assert all(u is not None and u.completion_tokens == 16 and f == "length" for _, u, f in results)
    scrape = server.grpc.scrape()
    assert metric(scrape, "switchboard_requests_total", tenant="acme", status="OK") >= n
    assert metric(scrape, "switchboard_kv_blocks_used") == 0


def open_stream(port: int, key: str, max_tokens: int) -> socket.socket:
    body = json.dumps({"model": MODEL_ID, "prompt": [5, 6, 7], "max_tokens": max_tokens, "stream": True,
                       "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_20_mid_stream_disconnects_leave_kv_use_at_zero(server):
    key = server.grpc.keys["acme"]
    engine = server.grpc.engine
    socks: list[socket.socket] = []
    errors: list[str] = []

    def client(i: int):
        try:
            sock = open_stream(server.http.port, key, max_tokens=4000)
            seen = b""
            while seen.count(b"data: ") < 3:  # the stream is running: a few token chunks arrived
                data = sock.recv(4096)
                if not data:
                    errors.append(f"client {i}: stream ended early")
                    return
                seen += data
            socks.append(sock)
        except OSError as exc:
            errors.append(f"client {i}: {exc}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(socks) == 20
    assert engine.stats().running == 20 and metric(server.grpc.scrape(), "switchboard_kv_blocks_used") > 0
    for sock in socks:
        sock.close()  # gone mid-stream, each about 4,000 tokens short
    wait_until(lambda: engine.stats().running == 0 and engine.stats().waiting == 0, timeout=30,
               what="every disconnected stream aborted")
    scrape = server.grpc.scrape()
    assert metric(scrape, "switchboard_kv_blocks_used") == 0 and metric(scrape, "switchboard_kv_usage_ratio") == 0
    assert metric(scrape, "switchboard_requests_in_flight", tenant="acme") == 0
    assert metric(scrape, "switchboard_requests_total", tenant="acme", status="CANCELLED") >= 20
    assert server.http.api.active_calls == 0


def test_load_test_drives_the_openai_api(server, tmp_path):
    """bench.load_test --protocol openai against the live HTTP API: every request completes, tokens counted."""
    from bench import load_test

    out = tmp_path / "openai.json"
    rc = load_test.main(["--protocol", "openai", "--target", f"127.0.0.1:{server.http.port}",
                         "--api-key", server.grpc.keys["acme"], "--num-requests", "16", "--concurrency", "4",
                         "--prompt-len", "uniform:4-12", "--output-len", "fixed:6", "--no-progress",
                         "--json", str(out)])
    report = json.loads(out.read_text())
    run = report["runs"][0]
    assert rc == 0 and run["errors"] == {} and report["protocol"] == "openai"
    assert run["completed"] == 16 and run["output_tokens"] == 16 * 6 and run["itl_ms"]["p50"] > 0


def test_unary_clients_that_disconnect_abort_their_sequences(server):
    engine = server.grpc.engine
    cancelled = metric(server.grpc.scrape(), "switchboard_requests_total", tenant="acme", status="CANCELLED")
    socks = []
    for _ in range(3):
        body = json.dumps({"model": MODEL_ID, "prompt": [5, 6, 7], "max_tokens": 4000, "ignore_eos": True}).encode()
        sock = socket.create_connection(("127.0.0.1", server.http.port), timeout=60)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {server.grpc.keys['acme']}\r\n".encode()
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        socks.append(sock)
    wait_until(lambda: engine.stats().running == 3, timeout=30, what="three unary requests running")
    for sock in socks:
        sock.close()
    wait_until(lambda: engine.stats().running == 0, timeout=30, what="the unary requests aborted")
    scrape = server.grpc.scrape()
    assert metric(scrape, "switchboard_kv_blocks_used") == 0
    assert metric(scrape, "switchboard_requests_total", tenant="acme", status="CANCELLED") == cancelled + 3
