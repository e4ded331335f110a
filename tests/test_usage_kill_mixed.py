"""Usage after a mixed load with a SIGKILL in the middle equals what was computed (issue 33).

300 calls of three tenants over gRPC (SwitchboardClient) and HTTP (the openai client), from 8 threads: calls
that finish (unary and streamed; tenant "done"), streams the client cancels after 1-4 chunks (about a third;
tenant "cut"), and calls with a deadline of 50-200 ms (tenant "late"). The server (`python -m server serve`,
tiny model) is SIGKILLed once ~110 of the first 150 calls are done, with calls in flight, restarted on the
same data directory, and serves the rest; then usage (every tenant, prompt / completion tokens, requests)
is read through the admin API.

The oracle is what the clients received, per call, as bounds on what the server may have billed it:
- a finished call: exactly its response's usage (prompt, completion, 1 request);
- a cancelled stream: its prompt exactly and one request (a token arrived, so the prompt was scheduled), and
  `received <= completion <= max_tokens`: the client counts the tokens it received (gRPC token ids, HTTP
  logprobs entries) but cannot know what the engine computed between its cancel and the abort, which is at
  most the call's max_tokens (32);
- an expired deadline: 0 or its prompt, 0..max_tokens completion tokens, 0 or 1 request (a call aborted while
  still waiting computed nothing and is not billed).
"Equals within the flush window" across the kill: usage.sqlite is flushed every 0.5 s, so a call the server
settled more than a second before the kill must be counted exactly (within its bounds above). A finished call
settles before its client sees the end, so one the client saw end before `kill - 1 s` must be there; a cut or
expired call settles after its client left (the server notices: gRPC at once, an HTTP unary hang-up within
0.5 s), so one whose client left before `kill - 2 s` must be there. A call ending later than that, or in
flight at the kill, may be counted or not (each call is recorded whole, in one flush), so it contributes
0..its upper bound. Calls after the restart must be counted exactly. Every stored total lies within the sums.
(The restarted server also runs with `--http-body-timeout 1`: a keyed POST whose body never comes gets 408.)
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from clients import DeadlineExceeded, SwitchboardClient
from server.tenants import hash_key, new_key
from tests.test_admin_crash import start_server

SEED = 3303
N_CALLS = 300
FIRST_HALF = 150
KILL_AFTER = 110  # calls of the first half done when the server is killed
CUT_MAX = 32  # max_tokens of cancelled streams and deadline calls
FINISHED_WINDOW_S = 1.0  # two flush intervals
LEFT_WINDOW_S = 2.0  # the flush window plus the time a cancel takes to reach the engine
TENANTS = ("done", "cut", "late")


@dataclass(frozen=True, slots=True)
class Job:
    face: str  # "grpc" | "http"
    how: str  # "unary" | "stream" (finished), "cut", "deadline"
    ids: tuple[int, ...]
    max_tokens: int
    cut_after: int  # chunks received before a "cut" cancels
    timeout_s: float  # a "deadline" call's

    @property
    def tenant(self) -> str:
        return {"unary": "done", "stream": "done", "cut": "cut", "deadline": "late"}[self.how]


@dataclass(frozen=True, slots=True)
class Bounds:
    """What the server may have billed one call, per field: (lowest, highest)."""

    tenant: str
    ended: float  # time.time() the client saw the call end
    prompt: tuple[int, int]
    completion: tuple[int, int]
    requests: tuple[int, int]
    settles_late: bool  # cut or expired: the bill settles after the client left
    kind: str  # "exact", "cut", "expired", "killed"


def _jobs(rng: random.Random) -> list[Job]:
    out = []
    for _ in range(N_CALLS):
        roll = rng.random()
        how = "unary" if roll < 0.22 else "stream" if roll < 0.45 else "cut" if roll < 0.78 else "deadline"
        ids = tuple(rng.randint(10, 999) for _ in range(rng.randint(2, 24)))
        out.append(Job(rng.choice(["grpc", "http"]), how, ids,
                       rng.randint(1, 12) if how in ("unary", "stream") else CUT_MAX, rng.randint(1, 4),
                       rng.choice([0.05, 0.1, 0.2])))
    return out


def _exact(job: Job, prompt: int, completion: int) -> Bounds:
    assert prompt == len(job.ids), (job, prompt)
    return Bounds(job.tenant, time.time(), (prompt, prompt), (completion, completion), (1, 1),
                  job.how in ("cut", "deadline"), "exact")


def _cut(job: Job, received: int) -> Bounds:
    assert received >= 1, job
    p = len(job.ids)
    return Bounds(job.tenant, time.time(), (p, p), (received, job.max_tokens), (1, 1), True, "cut")


def _expired(job: Job) -> Bounds:
    return Bounds(job.tenant, time.time(), (0, len(job.ids)), (0, job.max_tokens), (0, 1), True, "expired")


def _grpc(job: Job, target: str, key: str) -> Bounds:
    ids, n = list(job.ids), job.max_tokens
    with SwitchboardClient(target, api_key=key, timeout=60) as c:
        if job.how == "unary":
            r = c.generate(token_ids=ids, max_new_tokens=n, ignore_eos=True)
            assert r.completion_tokens == len(r.token_ids) == n
            return _exact(job, r.prompt_tokens, r.completion_tokens)
        if job.how == "stream":
            chunks = list(c.stream(token_ids=ids, max_new_tokens=n, ignore_eos=True))
            assert chunks[-1].completion_tokens == sum(len(ch.token_ids) for ch in chunks) == n
            return _exact(job, chunks[-1].prompt_tokens, chunks[-1].completion_tokens)
        if job.how == "cut":
            stream = c.stream(token_ids=ids, max_new_tokens=n, ignore_eos=True)
            received = 0
            for k, chunk in enumerate(stream, 1):
                received += len(chunk.token_ids)
                if chunk.finished:  # it ended before the client cut it
                    return _exact(job, chunk.prompt_tokens, chunk.completion_tokens)
                if k >= job.cut_after:
                    stream.close()  # cancels the call
                    break
            return _cut(job, received)
        try:
            r = c.generate(token_ids=ids, max_new_tokens=n, ignore_eos=True, timeout=job.timeout_s)
        except DeadlineExceeded:
            return _expired(job)
        return _exact(job, r.prompt_tokens, r.completion_tokens)


def _http(job: Job, base_url: str, key: str, model: str) -> Bounds:
    import openai

    timeout = job.timeout_s if job.how == "deadline" else 60
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout)
    args = {"model": model, "prompt": list(job.ids), "max_tokens": job.max_tokens, "extra_body": {"ignore_eos": True}}
    try:
        if job.how in ("unary", "deadline"):
            try:
                r = client.completions.create(**args)
            except openai.APITimeoutError:  # the client hangs up
                assert job.how == "deadline"
                return _expired(job)
            return _exact(job, r.usage.prompt_tokens, r.usage.completion_tokens)
        stream = client.completions.create(**args, stream=True, stream_options={"include_usage": True}, logprobs=0)
        received = chunks = 0
        with stream:
            for chunk in stream:
                if chunk.usage is not None:  # the last chunk: the stream finished
                    assert chunk.usage.completion_tokens == received, (chunk.usage, received)
                    return _exact(job, chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                if chunk.choices:
                    received += len(chunk.choices[0].logprobs.tokens)  # one entry per generated token
                    chunks += 1
                    if job.how == "cut" and chunks >= job.cut_after:
                        stream.close()  # the connection closes: the server sees its client gone
                        return _cut(job, received)
        raise AssertionError(f"a stream ended without its usage chunk: {job}")
    finally:
        client.close()


class Runner:
    def __init__(self, keys: dict[str, str]) -> None:
        self.keys = keys
        self.target = self.base_url = self.model = ""
        self.killed = threading.Event()
        self.done = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def serve(self, proc) -> None:
        self.target = re.search(r"serving on (\S+?)[;\s]", proc.banner)[1]
        self.base_url = re.search(r"OpenAI API at (\S+)", proc.banner)[1]
        import openai

        with openai.OpenAI(base_url=self.base_url, api_key=self.keys["done"], max_retries=0) as c:
            self.model = c.models.list().data[0].id
        self.killed = threading.Event()

    def run(self, job: Job) -> Bounds | None:
        """The call's bounds; None when it was not sent (the server had been killed: it is sent after the restart)."""
        if self.killed.is_set():
            return None
        key = self.keys[job.tenant]
        try:
            out = _grpc(job, self.target, key) if job.face == "grpc" else _http(job, self.base_url, key, self.model)
        except Exception as exc:  # noqa: BLE001 - the kill cut it, or a real failure
            if not self.killed.is_set():
                with self.lock:
                    self.failures.append(f"{job}: {type(exc).__name__}: {exc}")
            upper = len(job.ids)
            return Bounds(job.tenant, time.time(), (0, upper), (0, job.max_tokens), (0, 1), True, "killed")
        with self.lock:
            self.done += 1
        return out


def _slow_body_status(base_url: str, key: str) -> int | None:
    """The status a POST gets whose body never completes (its client sends nothing after the headers)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(base_url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                     "Content-Length: 100\r\n\r\n{".encode())
        data = sock.recv(65536)
    return int(data.split()[1]) if data else None


def _stored(target: str, admin_key: str) -> Counter:
    with SwitchboardClient(target, api_key=admin_key) as admin:
        rows = admin.get_usage().rows
    out = Counter()
    for r in rows:
        out[(r.tenant, "prompt")] += r.prompt_tokens
        out[(r.tenant, "completion")] += r.completion_tokens
        out[(r.tenant, "requests")] += r.requests
    return out


@pytest.mark.timeout(300)
def test_usage_after_a_mixed_load_and_a_sigkill_equals_what_was_computed(tiny_llama_dir: Path, tmp_path: Path):
    rng = random.Random(SEED)
    jobs = _jobs(rng)
    keys = {name: new_key() for name in ("admin", *TENANTS)}
    tenants = tmp_path / "tenants.toml"
    tenants.write_text("".join(f'[tenants.{n}]\nkey_sha256 = "{hash_key(k)}"\nmax_concurrent = 32\n\n'
                               for n, k in keys.items()))
    data = tmp_path / "data"
    runner = Runner(keys)
    started = time.monotonic()
    proc, _ = start_server(tiny_llama_dir, data, "--tenants", str(tenants))
    try:
        runner.serve(proc)
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(runner.run, j) for j in jobs[:FIRST_HALF]]
            while runner.done < KILL_AFTER and not all(f.done() for f in futures):
                time.sleep(0.01)
            killed_at = time.time()
            runner.killed.set()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            first = [f.result() for f in futures]
        assert not runner.failures, f"seed {SEED}: " + "\n".join(runner.failures[:5])
        in_flight = sum(1 for b in first if b is not None and b.kind == "killed")
        second_jobs = [j for j, b in zip(jobs[:FIRST_HALF], first, strict=True) if b is None] + jobs[FIRST_HALF:]
        proc, target = start_server(tiny_llama_dir, data, "--tenants", str(tenants), "--http-body-timeout", "1")
        runner.serve(proc)
        with ThreadPoolExecutor(8) as pool:
            second = list(pool.map(runner.run, second_jobs))
        assert _slow_body_status(runner.base_url, keys["done"]) == 408  # --http-body-timeout reaches the port
        assert not runner.failures, f"seed {SEED}: " + "\n".join(runner.failures[:5])
        time.sleep(1.0)  # the last cut calls' bills settle once the engine aborts them
        stored = _stored(target, keys["admin"])
        time.sleep(0.6)
        assert _stored(target, keys["admin"]) == stored, "usage still moving after the load ended"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)

    low, high = Counter(), Counter()

    def add(b: Bounds, sure: bool) -> None:
        for field in ("prompt", "completion", "requests"):
            lo, hi = getattr(b, field)
            low[(b.tenant, field)] += lo if sure else 0
            high[(b.tenant, field)] += hi

    for b in first:
        if b is not None:
            window = LEFT_WINDOW_S if b.settles_late else FINISHED_WINDOW_S
            add(b, sure=b.kind != "killed" and b.ended < killed_at - window)
    for b in second:
        add(b, sure=True)
    sent = [b for b in first + second if b is not None]
    kinds = Counter(b.kind for b in sent)
    print(f"\n{len(sent)} calls in {time.monotonic() - started:.0f} s: {dict(kinds)}; {in_flight} in flight at "
          f"the kill")
    for key in sorted(high):
        print(f"  {key}: stored {stored[key]} in [{low[key]}, {high[key]}]")
    assert len(sent) == N_CALLS and kinds["cut"] >= N_CALLS // 4, kinds
    for key in sorted(high):
        assert low[key] <= stored[key] <= high[key], (
            f"{key}: stored {stored[key]}, the clients allow [{low[key]}, {high[key]}] (seed {SEED})")
