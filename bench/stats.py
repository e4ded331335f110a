"""Per-request timings -> the load-test summary: throughput, latency percentiles, errors, goodput under an SLO.

Definitions (as in vLLM's serving benchmark and DistServe):
  TTFT  send -> first chunk carrying a token
  ITL   gaps between successive token-carrying chunks (one sample per gap, all requests pooled; a chunk
        that carries several tokens, when the server coalesces a lagging stream, counts once)
  TPOT  per request, (e2e - TTFT) / (output tokens - 1); requests with one token have none
  e2e   send -> last chunk
  goodput  requests per second that finished without error and met every SLO bound given
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestRecord:
    """What one request did, in seconds relative to its own send time."""

    adapter: str
    prompt_tokens: int
    max_new_tokens: int
    send_time: float = 0.0  # wall clock (perf_counter) when sent
    ttft_s: float | None = None
    e2e_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # arrival of each token-carrying chunk
    output_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    error: str | None = None  # gRPC status name (e.g. "RESOURCE_EXHAUSTED") or an exception class name
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itls_s(self) -> list[float]:
        return np.diff(self.token_times_s).tolist()


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency bounds in milliseconds; None = not constrained."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def met_by(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        if self.ttft_ms is not None and (r.ttft_s is None or r.ttft_s * 1e3 > self.ttft_ms):
            return False
        if self.tpot_ms is not None and (tpot := r.tpot_s) is not None and tpot * 1e3 > self.tpot_ms:
            return False
        return self.e2e_ms is None or (r.e2e_s is not None and r.e2e_s * 1e3 <= self.e2e_ms)

    def as_dict(self) -> dict:
        return {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "e2e_ms": self.e2e_ms}


def percentiles(values: list[float] | np.ndarray, qs: tuple[int, ...] = PERCENTILES) -> dict[str, float]:
    """{"p50": ..., "mean": ...} with linear interpolation (numpy's default); NaN for no values."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {**{f"p{q}": math.nan for q in qs}, "mean": math.nan}
    return {**{f"p{q}": float(np.percentile(arr, q)) for q in qs}, "mean": float(arr.mean())}


def _ms(values: list[float]) -> dict[str, float]:
    return {k: v * 1e3 for k, v in percentiles(values).items()}


def summarize(records: list[RequestRecord], duration_s: float, slo: SLO | None = None) -> dict:
    """The report of one run: JSON-ready, latencies in milliseconds."""
    if duration_s <= 0:
        raise ValueError("duration_s must be > 0")
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    errors = Counter(r.error for r in records if not r.ok)
    slo = slo or SLO()
    good = sum(slo.met_by(r) for r in records)
    return {
        "requests": len(records),
        "completed": len(ok),
        "errors": dict(sorted(errors.items())),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s,
        "output_token_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "output_tokens": out_tokens,
        "prompt_tokens": in_tokens,
        "ttft_ms": _ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": _ms([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_ms": _ms([g for r in ok for g in r.itls_s]),
        "e2e_ms": _ms([r.e2e_s for r in ok if r.e2e_s is not None]),
        "slo": slo.as_dict(),
        "slo_attainment": good / len(records) if records else math.nan,
        "goodput_rps": good / duration_s,
    }


def format_summary(s: dict) -> str:
    """A compact human-readable table of one summary."""
    lines = [
        f"requests {s['completed']}/{s['requests']} ok in {s['duration_s']:.1f} s; errors: {s['errors'] or 'none'}",
        f"throughput: {s['request_throughput']:.2f} req/s, {s['output_token_throughput']:.1f} output tok/s, "
        f"{s['total_token_throughput']:.1f} total tok/s",
        f"{'ms':<6}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}",
    ]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        p = s[key]
        lines.append(f"{key[:-3].upper():<6}" + "".join(f"{p[k]:>10.1f}" for k in ("p50", "p90", "p99", "mean")))
    bounds = ", ".join(f"{k[:-3]} <= {v:g} ms" for k, v in s["slo"].items() if v is not None) or "no bounds"
    lines.append(f"goodput ({bounds}): {s['goodput_rps']:.2f} req/s, attainment {s['slo_attainment']:.1%}")
    return "\n".join(lines)
