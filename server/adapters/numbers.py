"""The one check for a number read from an untrusted adapter config: a real number (JSON true is not one),
finite, within the field's bounds, an integer where the field counts something. Every kind's config numbers
go through `config_number` (lora_alpha and the LoRA scale, LongLoRA's RoPE factor, a bottleneck's scaling and
reduction_factor, merge weights), so a NaN or 1e300 is an INVALID_ARGUMENT naming the field at upload, never
a stored adapter that fails each request."""

from __future__ import annotations

import math

from server.adapters.kinds.base import AdapterFormatError
from server.clip import clip


def config_number(name: str, value: object, *, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False, integer: bool = False) -> float:
    """`value` as a float if it is a finite number in [lo, hi] (lo excluded when `lo_open`; an int when
    `integer`); else AdapterFormatError naming `name` and the allowed range."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        raise AdapterFormatError(f"{name} must be {kind}, got {clip(value)}")
    v = float(value) if not isinstance(value, int) or abs(value) < 2**1023 else math.inf
    if not math.isfinite(v):
        raise AdapterFormatError(f"{name} must be a finite number, got {clip(value)}")
    below = lo is not None and (v <= lo if lo_open else v < lo)
    if below or (hi is not None and v > hi):
        low = "-inf" if lo is None else f"{lo:g}"
        span = f"{'(' if lo_open or lo is None else '['}{low}, {'inf' if hi is None else f'{hi:g}'}]"
        raise AdapterFormatError(f"{name} = {v:.6g} is out of range: it must be in {span}")
    return v


def magnitude(name: str, value: object, bound: float) -> float:
    """A finite number with |value| <= bound (lora_alpha, scales, merge weights)."""
    v = config_number(name, value)
    if abs(v) > bound:
        raise AdapterFormatError(f"{name} = {v:.6g} is out of range: |{name}| must be <= {bound:g}")
    return v
