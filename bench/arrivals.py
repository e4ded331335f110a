"""Arrival processes and length distributions for load tests, all driven by one seeded numpy Generator.

Arrivals (open loop): inter-arrival gaps of a renewal process with mean 1/rate.
  poisson        exponential gaps (cv 1)
  gamma:<cv>     gamma gaps with shape 1/cv^2, scale cv^2/rate: cv > 1 is burstier than Poisson, cv < 1
                 smoother, cv 1 is Poisson (the burstiness knob of vLLM's and AlpaServe's benchmarks)
  constant       evenly spaced (cv 0)
Closed loop has no arrival times: a fixed number of clients each send the next request when theirs ends.

Lengths: `fixed:N`, `uniform:LO-HI` (inclusive), `normal:MEAN,STD` (rounded, clipped to >= 1),
`lognormal:MEDIAN,SIGMA` (rounded, clipped to >= 1), `exp:MEAN` (geometric, >= 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ARRIVAL_KINDS = ("poisson", "gamma:<cv>", "constant")
LENGTH_KINDS = ("fixed:N", "uniform:LO-HI", "normal:MEAN,STD", "lognormal:MEDIAN,SIGMA", "exp:MEAN")


def interarrival_gaps(kind: str, rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` gaps in seconds [n] between successive arrivals at mean `rate` requests/s."""
    if not rate > 0 or not np.isfinite(rate):
        raise ValueError(f"the request rate must be a finite number > 0, got {rate}")
    if n < 0:
        raise ValueError("n must be >= 0")
    name, _, arg = kind.partition(":")
    if name == "poisson":
        return rng.exponential(1.0 / rate, size=n)
    if name == "constant":
        return np.full(n, 1.0 / rate)
    if name == "gamma":
        cv = float(arg) if arg else 1.0
        if not cv > 0:
            raise ValueError(f"gamma cv must be > 0, got {cv}")
        shape = 1.0 / cv**2
        return rng.gamma(shape, 1.0 / (rate * shape), size=n)
    raise ValueError(f"unknown arrival process {kind!r}; one of {', '.join(ARRIVAL_KINDS)}")


def arrival_times(kind: str, rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Send times in seconds from the start [n]; the first request goes at t = 0."""
    gaps = interarrival_gaps(kind, rate, n, rng)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if n else gaps


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A token-length distribution parsed from a spec string (see the module docstring)."""

    spec: str

    def __post_init__(self) -> None:
        self.sample(1, np.random.default_rng(0))  # fail early on a bad spec

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """`n` lengths [n], each >= 1."""
        name, _, arg = self.spec.partition(":")
        try:
            if name == "fixed":
                value = int(arg)
                if value < 1:
                    raise ValueError
                return np.full(n, value, dtype=np.int64)
            if name == "uniform":
                lo, hi = (int(v) for v in arg.split("-"))
                if not 1 <= lo <= hi:
                    raise ValueError
                return rng.integers(lo, hi + 1, size=n)
            if name == "normal":
                mean, std = (float(v) for v in arg.split(","))
                if std < 0:
                    raise ValueError
                return np.maximum(1, np.rint(rng.normal(mean, std, size=n))).astype(np.int64)
            if name == "lognormal":
                median, sigma = (float(v) for v in arg.split(","))
                if median <= 0 or sigma < 0:
                    raise ValueError
                return np.maximum(1, np.rint(median * rng.lognormal(0.0, sigma, size=n))).astype(np.int64)
            if name == "exp":
                mean = float(arg)
                if mean < 1:
                    raise ValueError
                return rng.geometric(1.0 / mean, size=n).astype(np.int64)
        except ValueError:
            raise ValueError(f"bad length spec {self.spec!r}; one of {', '.join(LENGTH_KINDS)}") from None
        raise ValueError(f"unknown length distribution {self.spec!r}; one of {', '.join(LENGTH_KINDS)}")
