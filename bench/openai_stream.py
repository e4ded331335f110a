"""A lean asyncio client for the OpenAI-compatible API, for bench.load_test --protocol openai.

It streams `/v1/completions` with token-id prompts (the same requests the gRPC path sends) over plain
HTTP/1.1 on asyncio streams, one connection per request, and parses the server-sent events itself: the
client's own cost stays small next to the server's (the official `openai` package is checked in the tests).
Each content chunk counts as one token arrival; the exact number of tokens comes from the final usage chunk
(`stream_options.include_usage`), since OpenAI chunks carry text, not token ids.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field


class HttpStatusError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.code = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                     429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}.get(status, f"HTTP_{status}")


@dataclass
class OpenAIChunk:
    """What bench.load_run.send_one reads from a chunk (the gRPC StreamChunk's fields it uses)."""

    token_ids: list[int] = field(default_factory=list)  # one placeholder per content chunk
    finished: bool = False
    completion_tokens: int = 0  # on the final (usage) chunk


class OpenAIStreamClient:
    def __init__(self, base_url: str, api_key: str | None = None, model: str = "base") -> None:
        rest = base_url.removeprefix("http://").rstrip("/")
        hostport, _, prefix = rest.partition("/")
        host, _, port = hostport.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.prefix = "/" + prefix if prefix else ""
        self.api_key = api_key
        self.model = model

    async def stream(self, *, token_ids: list[int], adapter: str = "", max_new_tokens: int = 16,
                     temperature: float = 0.0, ignore_eos: bool = False, seed: int | None = None,
                     request_id: str = "", timeout: float | None = None):
        body = {"model": adapter or self.model, "prompt": token_ids, "max_tokens": max_new_tokens,
                "temperature": temperature, "ignore_eos": ignore_eos, "stream": True,
                "stream_options": {"include_usage": True}}
        if seed is not None:
            body["seed"] = seed
        if request_id:
            body["user"] = request_id
        async with asyncio.timeout(timeout):
            async for event in self._events("/v1/completions", json.dumps(body).encode()):
                if event.get("error"):
                    raise HttpStatusError(500, json.dumps(event["error"]))
                if event.get("usage"):
                    yield OpenAIChunk(finished=True, completion_tokens=event["usage"]["completion_tokens"])
                    continue
                for choice in event.get("choices", ()):
                    yield OpenAIChunk(token_ids=[-1] if choice.get("text") else [])

    async def _events(self, path: str, payload: bytes):
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            auth = f"Authorization: Bearer {self.api_key}\r\n" if self.api_key else ""
            writer.write(f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json"
                         f"\r\n{auth}Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            chunked = headers.get("transfer-encoding") == "chunked"
            if status != 200:
                raise HttpStatusError(status, (await _body(reader, chunked)).decode(errors="replace"))
            buf = b""
            async for piece in _pieces(reader, chunked):
                buf += piece
                while b"\n\n" in buf:
                    raw, buf = buf.split(b"\n\n", 1)
                    data = raw.removeprefix(b"data: ")
                    if data == b"[DONE]":
                        return
                    if data and not raw.startswith(b":"):
                        yield json.loads(data)
        finally:
            writer.close()

    def close(self) -> None:
        return None


async def _pieces(reader: asyncio.StreamReader, chunked: bool):
    if not chunked:
        while data := await reader.read(65536):
            yield data
        return
    while True:
        size = int((await reader.readline()).strip() or b"0", 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readline()


async def _body(reader: asyncio.StreamReader, chunked: bool) -> bytes:
    return b"".join([p async for p in _pieces(reader, chunked)])
