"""A call is billed what the engine computed, however it ends (server/lifecycle.py, shared by gRPC and HTTP).

The oracle is the engine itself: `Engine.on_logits` sees every row it sampled, so the completion tokens a
tenant's calls computed are counted independently of the accounting. Usage (server.usage) and the
tokens-per-minute bucket (server.quotas.charge_completion) must equal it for an SSE stream the client cut
mid-way, a unary HTTP client that hung up, a cancelled gRPC stream, an expired gRPC deadline and a finished
call with n=2 (its prompt billed once, as its response's `usage` says).
"""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter

import pytest

from clients import DeadlineExceeded
from tests.http_utils import MODEL_ID, running_http_server
from tests.server_utils import wait_until

TENANTS = ["sse", "unary", "stream", "deadline", "choices", "mixed"]
PROMPT = [5, 6, 7]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with running_http_server(tiny_llama_dir, tenants=TENANTS) as s:
        computed: Counter = Counter()
        charged: Counter = Counter()
        lock = threading.Lock()

        def on_logits(seqs, logits) -> None:  # engine thread: one sampled token per row
            with lock:
                for seq in seqs:
                    computed[seq.request.tenant] += 1

        s.grpc.engine.on_logits = on_logits
        quotas = s.grpc.server.quotas
        charge = quotas.charge_completion

        def spy(tenant, limits, completion_tokens) -> None:
            charged[tenant] += completion_tokens
            charge(tenant, limits, completion_tokens)

        quotas.charge_completion = spy
        s.computed, s.charged = computed, charged
        yield s


def _usage(server, tenant: str) -> tuple[int, int, int]:
    rows = server.grpc.server.usage.query(tenant)
    return (sum(r.prompt_tokens for r in rows), sum(r.completion_tokens for r in rows), sum(r.requests for r in rows))


def _settled(server, tenant: str, min_tokens: int) -> tuple[int, int, int]:
    """Usage once the engine is idle and the bill equals what it computed; the usage row."""
    engine = server.grpc.engine
    wait_until(lambda: engine.stats().running == 0 and engine.stats().waiting == 0, timeout=30, what="engine idle")
    wait_until(lambda: _usage(server, tenant)[1] == server.computed[tenant] >= min_tokens, timeout=10,
               what=f"{tenant}'s usage to equal the {server.computed[tenant]} tokens computed")
    assert server.charged[tenant] == server.computed[tenant]  # the tokens-per-minute bucket too
    return _usage(server, tenant)


def _post(server, tenant: str, body: dict) -> socket.socket:
    raw = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.http.port), timeout=60)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {server.grpc.keys[tenant]}\r\n".encode()
                 + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    return sock


def test_an_sse_stream_cut_by_its_client_is_billed_what_was_computed(server):
    sock = _post(server, "sse", {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True,
                                 "stream": True})
    received = b""
    while received.count(b"data: ") < 20:
        received += sock.recv(65536)
    sock.close()
    prompt, completion, requests = _settled(server, "sse", 20)
    assert (prompt, requests) == (len(PROMPT), 1) and completion < 4000


def test_a_unary_client_that_hangs_up_is_billed_what_was_computed(server):
    sock = _post(server, "unary", {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True})
    wait_until(lambda: server.computed["unary"] >= 10, timeout=30, what="tokens computed")
    sock.close()
    prompt, completion, requests = _settled(server, "unary", 10)
    assert (prompt, requests) == (len(PROMPT), 1) and completion < 4000


def test_a_cancelled_grpc_stream_is_billed_what_was_computed(server):
    with server.grpc.client("stream") as c:
        chunks = c.stream(token_ids=PROMPT, max_new_tokens=4000, ignore_eos=True)
        got = [next(chunks) for _ in range(10)]
        chunks.close()  # cancels the call
    prompt, completion, requests = _settled(server, "stream", sum(len(g.token_ids) for g in got))
    assert (prompt, requests) == (len(PROMPT), 1) and completion < 4000


def test_an_expired_grpc_deadline_is_billed_what_was_computed(server):
    with server.grpc.client("deadline") as c, pytest.raises(DeadlineExceeded):
        c.generate(token_ids=PROMPT, max_new_tokens=4000, ignore_eos=True, timeout=0.5)
    prompt, _, requests = _settled(server, "deadline", 1)
    assert (prompt, requests) == (len(PROMPT), 1)


def test_n_choices_bill_their_prompt_once_as_the_response_says(server):
    reply = server.openai("choices").completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=6, n=2,
                                                         extra_body={"ignore_eos": True})
    prompt, completion, requests = _settled(server, "choices", 12)
    assert (prompt, completion, requests) == (reply.usage.prompt_tokens, reply.usage.completion_tokens, 1)


def test_a_mixed_load_is_billed_exactly_what_was_computed(server):
    """40 calls of one tenant at once over gRPC and HTTP, finished, cut mid-stream, hung up and past their
    deadline: usage and the quota bucket equal the engine's count; the prompts lie between those of the calls
    that finished and those of every call."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    seed = 3301
    rng = random.Random(seed)
    jobs = [(rng.choice(["grpc", "http"]), rng.choice(["finish", "cut", "deadline"]), rng.randint(2, 9),
             rng.randint(4, 30)) for _ in range(40)]
    finished_prompts = []

    def one(job) -> None:
        face, how, n_prompt, n_new = job
        ids = [rng.randint(10, 999) for _ in range(n_prompt)]
        if face == "grpc":
            with server.grpc.client("mixed") as c:
                if how == "finish":
                    c.generate(token_ids=ids, max_new_tokens=n_new, ignore_eos=True)
                    finished_prompts.append(n_prompt)
                elif how == "cut":
                    chunks = c.stream(token_ids=ids, max_new_tokens=4000, ignore_eos=True)
                    for _ in range(min(3, n_new)):
                        next(chunks)
                    chunks.close()
                else:
                    with pytest.raises(DeadlineExceeded):
                        c.generate(token_ids=ids, max_new_tokens=4000, ignore_eos=True, timeout=0.3)
            return
        body = {"model": MODEL_ID, "prompt": ids, "max_tokens": n_new if how == "finish" else 4000,
                "ignore_eos": True, "stream": how == "cut"}
        sock = _post(server, "mixed", body)
        got = b""
        try:
            while True:
                chunk = sock.recv(65536)
                got += chunk
                if not chunk or (how == "finish" and got.rstrip().endswith(b"}")) or (
                        how == "cut" and got.count(b"data: ") >= 3) or how == "deadline":
                    break
        finally:
            sock.close()  # "deadline" over HTTP: the client hangs up at once
        if how == "finish":
            finished_prompts.append(n_prompt)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(one, jobs))
    prompt, completion, requests = _settled(server, "mixed", 1)
    every_prompt = sum(j[2] for j in jobs)
    assert sum(finished_prompts) <= prompt <= every_prompt, f"seed {seed}"
    assert len(finished_prompts) <= requests <= len(jobs), f"seed {seed}"
