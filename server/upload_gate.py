"""Uploads cannot hold the server: a cap on concurrent uploads (per tenant and in all) and a paced stream.

Without these, one tenant opening a few hundred uploads that send their metadata and then a byte every
few seconds held every gRPC worker and as many staging directories, indefinitely (issue 16 item 3).

- `UploadGate.admit(tenant)`: at most `per_tenant` uploads of one tenant and `total` in all at once
  (RESOURCE_EXHAUSTED beyond); staging therefore holds at most `total` uploads' spools.
- `paced(chunks, ...)`: the upload's chunks, read on a helper thread so that waiting for the next one
  is bounded: UploadStalled when nothing arrives for `idle_timeout_s`, or when the upload falls below
  `min_rate` bytes/s on average after a `grace_s` head start (a byte every 5 s is not an upload).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class UploadBusy(RuntimeError):
    """Too many uploads in flight, for the tenant or in all (RESOURCE_EXHAUSTED)."""


class UploadStalled(RuntimeError):
    """The upload stream went idle or too slow (DEADLINE_EXCEEDED); the message says which."""


@dataclass(frozen=True, slots=True)
class UploadPacing:
    idle_timeout_s: float = 30.0  # longest wait for the next chunk
    min_rate: float = 64 << 10  # bytes/s on average, after the grace period (0: no rate rule, idle only)
    grace_s: float = 30.0  # head start before the average rate counts


class UploadGate:
    def __init__(self, per_tenant: int, total: int) -> None:
        self.per_tenant = per_tenant
        self.total = total
        self._lock = threading.Lock()
        self._by_tenant: dict[str, int] = {}

    def in_flight(self) -> int:
        with self._lock:
            return sum(self._by_tenant.values())

    @contextmanager
    def admit(self, tenant: str):
        with self._lock:
            mine = self._by_tenant.get(tenant, 0)
            if mine >= self.per_tenant:
                raise UploadBusy(f"tenant {tenant!r} already has {mine} uploads in flight (limit {self.per_tenant})")
            if sum(self._by_tenant.values()) >= self.total:
                raise UploadBusy(f"the server already receives {self.total} uploads; retry later")
            self._by_tenant[tenant] = mine + 1
        try:
            yield
        finally:
            with self._lock:
                self._by_tenant[tenant] -= 1
                if not self._by_tenant[tenant]:
                    del self._by_tenant[tenant]


_END = object()


def paced(chunks: Iterable, pacing: UploadPacing, size_of=lambda chunk: len(chunk.data),
          clock=time.monotonic) -> Iterator:
    """`chunks` re-yielded, raising UploadStalled when the next one is late (see the module docstring).

    The helper thread stops when `chunks` ends or fails; gRPC ends a call's request iterator when the
    call ends, so aborting the call after UploadStalled releases it."""
    q: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()

    def pump() -> None:
        try:
            for chunk in chunks:
                while not stop.is_set():
                    try:
                        q.put(chunk, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except Exception as exc:  # the call was cancelled or broke: hand it to the reader
            q.put(exc)

    threading.Thread(target=pump, name="upload-pump", daemon=True).start()
    start = clock()
    received = 0
    try:
        while True:
            now = clock()
            rate_deadline = start + pacing.grace_s + received / pacing.min_rate if pacing.min_rate > 0 else math.inf
            wait = min(pacing.idle_timeout_s, rate_deadline - now)
            try:
                item = q.get(timeout=max(wait, 0.0)) if wait > 0 else q.get_nowait()
            except queue.Empty:
                if rate_deadline - now <= pacing.idle_timeout_s:
                    raise UploadStalled(
                        f"the upload is too slow: {received} bytes in {now - start:.0f} s (the minimum is "
                        f"{pacing.min_rate:.0f} bytes/s after {pacing.grace_s:g} s)") from None
                raise UploadStalled(f"the upload sent nothing for {pacing.idle_timeout_s:g} s") from None
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            received += size_of(item)
            yield item
    finally:
        stop.set()
