"""Request building shared by the sync and asyncio clients (no I/O on the channel here)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

from clients.stubs import admin_pb2, inference_pb2

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def generate_request(
    prompt: str | None = None, *, messages: list[dict] | None = None, token_ids: list[int] | None = None,
    adapter: str = "", max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
    seed: int | None = None, stop: list[str | bytes] | None = None, ignore_eos: bool = False,
    request_id: str = "", min_p: float | None = None, presence_penalty: float | None = None,
    frequency_penalty: float | None = None, repetition_penalty: float | None = None,
    logit_bias: dict[int, float] | None = None, min_tokens: int | None = None, logprobs: bool = False,
    top_logprobs: int | None = None,
) -> inference_pb2.GenerateRequest:
    """A GenerateRequest; the server validates every value (bad ones come back as InvalidArgument).
    Unset (None) optional sampling values take the server's defaults."""
    req = inference_pb2.GenerateRequest(
        adapter=adapter, prompt=prompt or "", token_ids=token_ids or [], max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, ignore_eos=ignore_eos, request_id=request_id,
        stop=[s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in stop or ()],
    )
    for m in messages or ():
        req.messages.add(role=m.get("role", ""), content=m.get("content", ""))
    if seed is not None:
        req.seed = seed
    optional = {"min_p": min_p, "presence_penalty": presence_penalty, "frequency_penalty": frequency_penalty,
                "repetition_penalty": repetition_penalty, "min_tokens": min_tokens, "top_logprobs": top_logprobs}
    for name, value in optional.items():
        if value is not None:
            setattr(req, name, value)
    for token, bias in (logit_bias or {}).items():
        req.logit_bias[int(token)] = bias
    req.logprobs = logprobs
    return req


def adapter_payload(path: str | Path) -> bytes:
    """The upload payload: a .tar file as is, or a PEFT directory tarred on the fly (its two files)."""
    path = Path(path)
    if path.is_file():
        return path.read_bytes()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a PEFT adapter directory nor a .tar file")
    missing = [f for f in PEFT_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory: missing {', '.join(missing)}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in PEFT_FILES:
            tar.add(path / name, arcname=name, recursive=False)
    return buf.getvalue()


def upload_chunks(payload: bytes, name: str, tenant: str, shared: bool, chunk_bytes: int
                  ) -> Iterator[admin_pb2.UploadChunk]:
    meta = admin_pb2.UploadMetadata(name=name, tenant=tenant, shared=shared,
                                    sha256=hashlib.sha256(payload).hexdigest(), total_bytes=len(payload))
    yield admin_pb2.UploadChunk(metadata=meta)
    for start in range(0, len(payload), max(1, chunk_bytes)):
        yield admin_pb2.UploadChunk(data=payload[start : start + chunk_bytes])


def merge_request(name: str, sources: list[str], *, method: str = "linear", weights: list[float] | None = None,
                  density: float | None = None, target_rank: int | None = None, seed: int | None = None,
                  shared: bool = False, tenant: str = "") -> admin_pb2.MergeRequest:
    req = admin_pb2.MergeRequest(name=name, sources=sources, method=method, weights=weights or [], shared=shared,
                                 tenant=tenant)
    if density is not None:
        req.density = density
    if target_rank is not None:
        req.target_rank = target_rank
    if seed is not None:
        req.seed = seed
    return req


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()
