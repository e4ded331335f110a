"""The soak's HTTP tenants: the openai client against the OpenAI-compatible port, alongside the gRPC workers.

Each worker loops over: a unary completion, a stream read to its end (with its usage chunk), a stream cancelled
after its first chunk (the connection closed mid-stream), and a unary call whose client gives up after 50 ms.
Every call goes into the usage ledger (bench.soak_ledger) with what the client received: the response's usage,
or for a cancelled stream the tokens it received (one logprobs entry per token).
"""

from __future__ import annotations

import random
import threading

OK = "OK"


def _status(exc: Exception) -> str:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return "TIMEOUT"
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}"
    return type(exc).__name__


def http_worker(base_url: str, model: str, key: str, tenant: str, adapters: list[str], tally, ledger,
                stop: threading.Event, seed: int) -> None:
    import openai

    rng = random.Random(seed)
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)
    hasty = client.with_options(timeout=0.05)
    try:
        while not stop.is_set():
            ids = [rng.randrange(5, 1000) for _ in range(rng.randint(2, 24))]
            name = rng.choice(["", *adapters]) or model
            roll = rng.random()
            action, allowed = ("http generate", {OK}) if roll < 0.35 else ("http stream", {OK}) if roll < 0.65 \
                else ("http cancel", {OK}) if roll < 0.9 else ("http deadline", {OK, "TIMEOUT"})
            max_tokens = rng.randint(1, 12) if action in ("http generate", "http stream") else 64
            entry = ledger.open(tenant, len(ids), max_tokens)
            args = {"model": name, "prompt": ids, "max_tokens": max_tokens, "extra_body": {"ignore_eos": True}}
            try:
                if action in ("http generate", "http deadline"):
                    r = (client if action == "http generate" else hasty).completions.create(**args)
                    entry.exact(r.usage.prompt_tokens, r.usage.completion_tokens)
                else:
                    _stream(client, args, entry, cancel=action == "http cancel")
                status, message = OK, ""
            except Exception as exc:  # noqa: BLE001 - the tally judges it
                status, message = _status(exc), str(exc)
            tally.record(action, status, allowed, message)
    finally:
        client.close()


def _stream(client, args: dict, entry, cancel: bool) -> None:
    stream = client.completions.create(**args, stream=True, stream_options={"include_usage": True}, logprobs=0)
    received = 0
    with stream:  # closed however it ends: a stream read to its end leaves its connection open until collected
        for chunk in stream:
            if chunk.usage is not None:  # the last chunk: the stream finished before any cancel
                entry.exact(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                return
            if chunk.choices:
                received += len(chunk.choices[0].logprobs.tokens)
                if cancel:
                    stream.close()  # the connection closes mid-stream
                    entry.cut(len(args["prompt"]), received)
                    return
    raise RuntimeError("the stream ended without its usage chunk")
