"""A request's adapter composition: several LoRA adapters ("parts"), each with a weight, served in the same batch.

The output is the base plus sum_p weight_p * delta_p (PEFT with the parts active at once and each one's scaling
multiplied by its weight). Every part is resolved, reserved and pinned in its own slot like a single adapter, and
released with the request; a composition creates no stored adapter. Only plain LoRA (and rsLoRA) parts compose:
DoRA's magnitude normalization is per adapter (a weighted DoRA is not a weighted delta), and LongLoRA's own norms,
embeddings and RoPE factor cannot be mixed with another adapter's; both are refused, as are kinds outside the LoRA
family. The kernels' side is kernels/compose.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from server.engine.request import AdapterPart, InvalidRequest
from server.engine.scheduler import Admission
from server.engine.sequence import Sequence

MAX_PART_WEIGHT = 100.0  # |weight| bound: larger ones only amplify noise into overflow
__all__ = ["MAX_PART_WEIGHT", "AdapterPart", "check_parts", "composition_identity", "pin_parts"]


def check_parts(parts: tuple[AdapterPart, ...], limit: int, device_slots: int,
                composable: Callable[[str], tuple[str, bool]]) -> None:
    """InvalidRequest for a composition the engine cannot serve: more parts than `limit` (or than device slots),
    a repeated part, a non-finite or too large weight, a part of a kind that does not compose. composable(key): the
    part's kind name and whether its kind composes (the kind's own `composable` flag); it raises
    what the pool raises for an unknown key (the caller maps it to NOT_FOUND)."""
    if len(parts) > limit:
        raise InvalidRequest(f"a request may compose at most {limit} adapters, got {len(parts)}")
    if len(parts) > device_slots:
        raise InvalidRequest(f"{len(parts)} adapters cannot be pinned at once: the server has {device_slots} "
                             "device slots")
    seen: set[str] = set()
    for i, part in enumerate(parts):
        if part.key in seen:
            raise InvalidRequest(f"adapters[{i}] repeats an adapter; name each part once")
        seen.add(part.key)
        if not math.isfinite(part.weight) or abs(part.weight) > MAX_PART_WEIGHT:
            raise InvalidRequest(f"adapters[{i}].weight must be a finite number in [-{MAX_PART_WEIGHT:g}, "
                                 f"{MAX_PART_WEIGHT:g}], got {part.weight}")
    for i, part in enumerate(parts):
        kind, ok = composable(part.key)
        if not ok:
            raise InvalidRequest(f"adapters[{i}] is a {kind} adapter; only LoRA adapters can be composed or "
                                 "weighted (DoRA's norms are per adapter, LongLoRA's norms / embeddings / RoPE "
                                 "factor cannot mix)")


def composition_identity(parts: tuple[AdapterPart, ...], identity_of: Callable[[str], str]) -> str:
    """The prefix cache's adapter identity of a composition: every part's identity (its kind and content digest)
    with its weight, in order, so another version, weight or order of parts never reuses these KV blocks."""
    return "compose[" + ",".join(f"{identity_of(p.key)}*{p.weight!r}" for p in parts) + "]"


def pin_parts(pool, seq: Sequence) -> tuple[Admission, str | None]:
    """The scheduler's admission of a composition: every part pinned in its slot (pool.acquire, allowed to displace
    an adapter only waiting requests hold), or none (the parts stay reserved, so none is evicted for an unrelated
    adapter while the others load)."""
    leases = []
    for part in seq.request.parts:
        try:
            lease, failed = pool.acquire(part.key, displace=True), None
        except Exception as exc:  # unregistered or unreadable since submit()
            lease, failed = None, f"adapter {part.key!r} unavailable: {exc}"
        if lease is None:
            for held, _ in leases:
                pool.release(held.key)
            return (Admission.NOT_NOW, None) if failed is None else (Admission.FAILED, failed)
        leases.append((lease, part.weight))
    seq.part_leases = leases
    seq.part_versions = tuple(lease.version for lease, _ in leases)
    return Admission.ADMITTED, None
