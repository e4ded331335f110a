"""Request building shared by the sync and asyncio clients (no I/O on the channel here)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict, Unpack

from clients.stubs import admin_pb2, inference_pb2

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTERHUB_WEIGHTS = "adapter.safetensors"  # the AdapterHub `adapters` library's safetensors name


class GenerateOptions(TypedDict, total=False):
    """Every option of a generate / stream call, declared once (the clients' methods take them as **options).

    Exactly one of a prompt (raw text, the methods' first argument), `messages` (chat template applied by
    the server) or `token_ids`. temperature 0 = greedy; stop strings are not returned."""

    messages: list[dict]
    token_ids: list[int]
    adapter: str  # "" = the base model
    adapters: list[tuple[str, float]]  # a composition: (adapter name, weight) per part; `adapter` stays ""
    max_new_tokens: int  # default 64
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: list[str | bytes]
    ignore_eos: bool
    request_id: str
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: dict[int, float]  # token id -> added to its logit
    min_tokens: int
    logprobs: bool  # the sampled token's log-probability on every token
    top_logprobs: int  # and the k most likely alternatives
    # structured output, at most one: a JSON schema (dict or JSON text), any JSON object, a regex the whole
    # output matches, one of a list of strings, or a Lark / GBNF grammar
    json_schema: dict | str
    json_object: bool
    regex: str
    choice: list[str]
    grammar: str
    cache_salt: str  # prefix-cache reuse only among the tenant's requests with this salt


def generate_request(prompt: str | None = None, **options: Unpack[GenerateOptions]) -> inference_pb2.GenerateRequest:
    """A GenerateRequest; the server validates every value (bad ones come back as InvalidArgument)."""
    unknown = set(options) - set(GenerateOptions.__annotations__)
    if unknown:
        raise TypeError(f"unknown generate option(s): {', '.join(sorted(unknown))}")
    o = options
    req = inference_pb2.GenerateRequest(
        adapter=o.get("adapter", ""), prompt=prompt or "", token_ids=o.get("token_ids") or [],
        max_new_tokens=o.get("max_new_tokens", 64), temperature=o.get("temperature", 0.0), top_p=o.get("top_p", 1.0),
        top_k=o.get("top_k", 0), ignore_eos=o.get("ignore_eos", False), request_id=o.get("request_id", ""),
        stop=[s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in o.get("stop") or ()],
    )
    for m in o.get("messages") or ():
        req.messages.add(role=m.get("role", ""), content=m.get("content", ""))
    if o.get("seed") is not None:
        req.seed = o["seed"]
    for name in ("min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "top_logprobs",
                 "cache_salt"):
        if o.get(name) is not None:
            setattr(req, name, o[name])
    for token, bias in (o.get("logit_bias") or {}).items():
        req.logit_bias[int(token)] = bias
    req.logprobs = bool(o.get("logprobs", False))
    _constraint(req, o)
    for name, weight in o.get("adapters") or ():
        req.adapters.add(name=name, weight=weight)
    return req


def _constraint(req: inference_pb2.GenerateRequest, o: dict) -> None:
    given = [k for k in ("json_schema", "json_object", "regex", "choice", "grammar") if o.get(k) not in (None, False)]
    if len(given) > 1:
        raise TypeError(f"set at most one output constraint, got {', '.join(given)}")
    if not given:
        return
    key = given[0]
    value = o[key]
    if key == "json_schema":
        req.constraint.json_schema = value if isinstance(value, str) else json.dumps(value)
    elif key == "choice":
        req.constraint.choice.options.extend(value)
    else:
        setattr(req.constraint, key, value)


def adapter_payload(path: str | Path) -> bytes:
    """The upload payload: a .tar file as is, or a PEFT directory tarred on the fly (its two files)."""
    path = Path(path)
    if path.is_file():
        return path.read_bytes()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a PEFT adapter directory nor a .tar file")
    files = PEFT_FILES
    if not (path / PEFT_FILES[1]).is_file() and (path / ADAPTERHUB_WEIGHTS).is_file():
        files = (PEFT_FILES[0], ADAPTERHUB_WEIGHTS)  # an AdapterHub directory: its weights under its own name
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory: missing {', '.join(missing)}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in files:
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
