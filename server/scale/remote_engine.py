"""RemoteEngine: the Engine interface the gRPC face (server.service, server.admin_service) uses, over the
engine deployment. The ingress's servicers run unchanged on top of it.

One request = one streaming call of `EngineReplica.generate`, pumped by a thread into a RequestHandle.
With affinity the call carries the resolved pool key as the multiplexed model id. Failure handling:
- the replica fails before the request produced a token (actor died, replica unavailable): the same
  request is submitted again (Ray picks a live replica) up to `retries` times;
- it fails after tokens were sent: the handle raises UNAVAILABLE with CUT_MESSAGE, which the client library
  turns into one automatic retry;
- the replica refused the request (invalid, queue full, unknown adapter): that error, as the engine raised it.
The ingress loads only the base model's config and tokenizer (tokenizing, validation, adapter checks), never
its weights.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from server.adapters.peft_format import read_adapter
from server.adapters.pool import AdapterPool
from server.engine.engine import EngineStats
from server.engine.request import EngineStopped, GenerationRequest, InvalidRequest, RequestHandle
from server.scale.settings import ScaleSettings
from server.status import RequestError, status_of
from server.structured.compiler import GrammarCompiler

log = logging.getLogger(__name__)

CUT_MESSAGE = "the replica serving this request went away mid-stream; retry the request"
RETRY_BACKOFF_S = 0.25


class RemoteHandle(RequestHandle):
    """A RequestHandle whose get() raises the request's failure (queued as an exception) instead of an event,
    as `raise_as(exc)` makes it (the gRPC face: as is; the HTTP face: its ApiError)."""

    def __init__(self, request_id: str, raise_as: Callable[[BaseException], BaseException]) -> None:
        super().__init__(request_id)
        self.raise_as = raise_as

    def fail(self, exc: BaseException) -> None:
        self.put(exc)  # type: ignore[arg-type]

    def get(self, timeout: float | None = None):
        item = self._events.get(timeout=timeout)
        if isinstance(item, BaseException):
            self.done = True
            raise self.raise_as(item)
        if item.finished:
            self.done = True
        return item


@dataclass(slots=True)
class _Call:
    request: GenerationRequest
    handle: RemoteHandle
    stream: object | None = None  # the DeploymentResponseGenerator in flight
    aborted: bool = False


class _NoQueue:
    """The ingress has no waiting queue (each replica's scheduler has its own): tenant weights are recorded."""

    def __init__(self) -> None:
        self.weights: dict[str, float] = {}

    def set_weights(self, weights: dict[str, float]) -> None:
        self.weights = dict(weights)

    def snapshot(self) -> dict:
        return {}


@dataclass(slots=True)
class _Scheduler:
    waiting: _NoQueue


class RemoteEngine:
    def __init__(self, deployment, settings: ScaleSettings,
                 raise_as: Callable[[BaseException], BaseException] = lambda exc: exc) -> None:
        from transformers import AutoTokenizer

        from server.model.args import ModelArgs
        from server.model.checkpoint import resolve_model_dir

        model_cfg, pool_cfg = settings.model_config(), settings.pool_config()
        model_dir = resolve_model_dir(model_cfg.path, model_cfg.cache_dir)
        self.args = ModelArgs.from_dir(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # output constraints checked at the ingress (a bad one is INVALID_ARGUMENT here); replicas compile their own
        self.grammars = GrammarCompiler(self.tokenizer, self.args.vocab_size)
        self.config = settings.engine_config()
        self.max_model_len = min(self.config.max_model_len or self.args.max_position_embeddings,
                                 self.args.sliding_window or 1 << 62)

        def read(path):
            return read_adapter(path, self.args, pool_cfg.limits)

        # the registry's bookkeeping and upload validation; one slot (nothing runs here)
        self.pool = AdapterPool(dataclasses.replace(pool_cfg, device_slots=1, host_cache_bytes=64 << 20),
                                self.args, model_cfg.torch_dtype, "cpu", reader=read)
        self.scheduler = _Scheduler(_NoQueue())
        self.deployment = deployment
        self.raise_as = raise_as
        self.affinity = settings.affinity
        self.retries = settings.retries
        self._calls: dict[str, _Call] = {}
        self._lock = threading.Lock()
        self._running = True
        self.resubmitted = 0  # requests sent again after their replica failed before a token
        self.cut = 0  # requests whose replica failed after tokens were sent (the caller retries)

    # ---- the Engine interface ------------------------------------------------------------------
    def submit(self, req: GenerationRequest) -> RemoteHandle:
        call = _Call(req, RemoteHandle(req.request_id, self.raise_as))
        with self._lock:
            if req.request_id in self._calls:
                raise InvalidRequest(f"request_id {req.request_id!r} is already in flight")
            self._calls[req.request_id] = call
        threading.Thread(target=self._pump, args=(call,), name="ray-stream", daemon=True).start()
        return call.handle

    def submit_group(self, reqs: list[GenerationRequest]) -> list[RemoteHandle]:
        return [self.submit(r) for r in reqs]  # n choices run as n requests (no KV sharing across replicas)

    def abort(self, request_id: str) -> None:
        with self._lock:
            call = self._calls.get(request_id)
        if call is not None:
            call.aborted = True
            if call.stream is not None:
                call.stream.cancel()

    @property
    def alive(self) -> bool:
        return self._running

    def start(self) -> None:
        self._running = True

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        self._running = False
        with self._lock:
            ids = list(self._calls)
        for request_id in ids:
            self.abort(request_id)

    def stats(self) -> EngineStats:
        """The ingress's view: requests in flight through it (per-replica figures: Ray's metrics export)."""
        with self._lock:
            n = len(self._calls)
        return EngineStats(running=n, waiting=0, kv_blocks_used=0, kv_blocks_total=0, batch_size=0,
                           batch_tokens=0, adapters_resident=0, steps=0, preemptions=0)

    # ---- one request's stream ------------------------------------------------------------------
    def _open(self, req: GenerationRequest):
        options = {"stream": True}
        if self.affinity and req.adapter:
            options["multiplexed_model_id"] = req.adapter
        return self.deployment.options(**options).generate.remote(req)

    def _pump(self, call: _Call) -> None:
        tokens, attempt = 0, 0
        try:
            while not call.aborted:
                try:
                    call.stream = self._open(call.request)
                    for event in call.stream:
                        tokens += len(event.token_ids) or 1
                        call.handle.put(event)
                        if event.finished:
                            return
                    raise ConnectionError("the replica's stream ended before the request finished")
                except Exception as exc:  # noqa: BLE001 - sorted below: refusals vs failures
                    if call.aborted:
                        return
                    refusal = _refusal(exc)
                    if refusal is not None:
                        call.handle.fail(refusal)
                        return
                    if tokens or attempt >= self.retries:
                        log.warning("request %s: replica failed after %d tokens (%s)", call.request.request_id,
                                    tokens, type(exc).__name__)
                        self.cut += bool(tokens)
                        call.handle.fail(RequestError(grpc.StatusCode.UNAVAILABLE, CUT_MESSAGE if tokens else
                                                      f"no replica could serve the request ({type(exc).__name__})"))
                        return
                    attempt += 1
                    self.resubmitted += 1
                    time.sleep(RETRY_BACKOFF_S * attempt)
        finally:
            with self._lock:
                self._calls.pop(call.request.request_id, None)


def _refusal(exc: BaseException) -> BaseException | None:
    """The engine's own error that a replica raised (a status the table knows), or None for a failure of Ray."""
    cause = getattr(exc, "cause", None)
    for candidate in (cause, exc):
        if (isinstance(candidate, BaseException) and not _is_ray_error(candidate)
                and not isinstance(candidate, EngineStopped) and status_of(candidate) is not None):
            return candidate  # (a replica shutting down is a failure: the request goes to another one)
    return None


def _is_ray_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("ray.")
