"""Per-tenant quotas: token buckets for requests and tokens per minute, and adapter-store limits.

Tenants-file fields (all optional; absent = unlimited), parsed by `parse_limits`:

    [tenants.acme]
    weight = 2.0                  # VTC share (server.engine.fairness); default 1
    tokens_per_minute = 20000     # prompt + completion tokens, a token bucket of that size refilled per minute
    requests_per_minute = 600     # a token bucket of requests
    max_adapters = 10             # adapters stored by the tenant
    max_adapter_bytes = 1e9       # bytes stored (the newest version of each adapter)

A request needs one request token and its prompt's tokens at arrival; its completion tokens are charged
as it finishes, so a long generation can take the bucket below zero and the next request waits until it
refills. Over a limit: `QuotaExceeded` (RESOURCE_EXHAUSTED) naming the limit, with `retry_after_s`, the
time until the bucket holds what was asked (sent as `retry-after` trailing metadata, whole seconds).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

LIMIT_FIELDS = ("tokens_per_minute", "requests_per_minute", "max_adapters", "max_adapter_bytes")


class QuotaExceeded(RuntimeError):
    """A tenant is over one of its limits (maps to RESOURCE_EXHAUSTED; retry_after_s None = not by waiting)."""

    def __init__(self, limit: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> str | None:
        """Whole seconds, rounded up (at least 1), as HTTP's Retry-After and our trailing metadata carry it."""
        return None if self.retry_after_s is None else str(max(1, math.ceil(self.retry_after_s)))


@dataclass(frozen=True, slots=True)
class TenantLimits:
    weight: float = 1.0
    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None
    max_adapters: int | None = None
    max_adapter_bytes: int | None = None


def parse_limits(table: str, entry: dict) -> TenantLimits:
    """The weight and limits of one `[tenants.<name>]` entry; ValueError naming the field when one is wrong."""
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= 1000:
        raise ValueError(f"[{table}] weight must be a number in (0, 1000], got {weight!r}")
    values = {}
    for name in LIMIT_FIELDS:
        v = entry.get(name)
        if v is None:
            continue
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"[{table}] {name} must be an integer >= 1, got {v!r}")
        values[name] = v
    return TenantLimits(weight=float(weight), **values)


class TokenBucket:
    """`capacity` tokens, refilled at capacity per `period_s`; may go negative (debt) through `charge`."""

    def __init__(self, capacity: float, period_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.rate = capacity / period_s
        self.clock = clock
        self.level = capacity
        self._t = clock()

    def resize(self, capacity: float, period_s: float = 60.0) -> None:
        self._refill()
        self.capacity, self.rate = capacity, capacity / period_s
        self.level = min(self.level, capacity)

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self._t) * self.rate)
        self._t = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` tokens are available (0 = now)."""
        self._refill()
        return max(0.0, (amount - self.level) / self.rate)

    def charge(self, amount: float) -> None:
        self._refill()
        self.level -= amount


class Quotas:
    """The token buckets of every tenant (thread-safe). Limits come with each call (the caller's Tenant, as
    the current tenants file says), so a reload changes them for the next request."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, tenant: str, kind: str, capacity: int) -> TokenBucket:
        bucket = self._buckets.get((tenant, kind))
        if bucket is None:
            bucket = self._buckets[(tenant, kind)] = TokenBucket(capacity, clock=self.clock)
        elif bucket.capacity != capacity:
            bucket.resize(capacity)
        return bucket

    def admit(self, tenant: str, limits: TenantLimits, prompt_tokens: int) -> None:
        """Take one request and `prompt_tokens` from the tenant's buckets, or raise QuotaExceeded (taking nothing)."""
        with self._lock:
            checks = []
            if limits.requests_per_minute is not None:
                checks.append(("requests_per_minute", self._bucket(tenant, "requests", limits.requests_per_minute),
                               1, limits.requests_per_minute, "requests"))
            if limits.tokens_per_minute is not None:
                tpm = limits.tokens_per_minute
                if prompt_tokens > tpm:
                    raise QuotaExceeded("tokens_per_minute", f"tenant {tenant!r}: the prompt has {prompt_tokens} "
                                        f"tokens, more than its tokens_per_minute limit of {tpm}")
                checks.append(("tokens_per_minute", self._bucket(tenant, "tokens", tpm), max(1, prompt_tokens), tpm,
                               "tokens"))
            for limit, bucket, amount, capacity, unit in checks:
                wait = bucket.wait_for(amount)
                if wait > 0:
                    raise QuotaExceeded(limit, f"tenant {tenant!r} is over its {limit} limit of {capacity} {unit}; "
                                        f"retry in {wait:.1f} s", retry_after_s=wait)
            for _, bucket, amount, _, unit in checks:
                bucket.charge(prompt_tokens if unit == "tokens" else amount)

    def charge_completion(self, tenant: str, limits: TenantLimits, completion_tokens: int) -> None:
        """Completion tokens of a finished (or cancelled) request: they count against tokens_per_minute."""
        if limits.tokens_per_minute is None or completion_tokens <= 0:
            return
        with self._lock:
            self._bucket(tenant, "tokens", limits.tokens_per_minute).charge(completion_tokens)


def check_storage(tenant: str, limits: TenantLimits, existing: list, name: str, new_bytes: int) -> None:
    """Refuse a new stored adapter (upload or merge) over max_adapters / max_adapter_bytes.
    `existing`: the tenant's own AdapterInfos (name, size_bytes); a new version of `name` replaces its size."""
    others = [a for a in existing if a.name != name]
    if limits.max_adapters is not None and len(others) + 1 > limits.max_adapters:
        raise QuotaExceeded("max_adapters", f"tenant {tenant!r} already stores {len(others)} adapters, its "
                            f"max_adapters limit is {limits.max_adapters}; delete one first")
    stored = sum(a.size_bytes for a in others)
    if limits.max_adapter_bytes is not None and stored + new_bytes > limits.max_adapter_bytes:
        raise QuotaExceeded("max_adapter_bytes", f"tenant {tenant!r} stores {stored} bytes of adapters; "
                            f"{new_bytes} more would pass its max_adapter_bytes limit of {limits.max_adapter_bytes}")
