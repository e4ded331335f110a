"""A request's `adapters` list (HTTP body field, repeated gRPC field) -> the engine's composition parts.

Each part is resolved through the registry exactly as a single adapter is (names, tenants, visibility, the newest
version pinned by its pool key: hot swap applies per part). One part of weight 1 is the plain adapter (the engine's
single-adapter path, any kind); otherwise the engine checks the parts (server/engine/composition.py: LoRA only,
the limit, device slots). Metrics and usage name every part ("owner/a+owner/b"); the response lists each part with
its version and weight. Errors are InvalidRequest (INVALID_ARGUMENT / 400) or the registry's (NOT_FOUND /
PERMISSION_DENIED, as for `adapter`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.clip import clip
from server.engine.composition import MAX_PART_WEIGHT
from server.engine.request import AdapterPart, InvalidRequest


@dataclass(frozen=True, slots=True)
class PartSpec:
    name: str  # as the caller wrote it ("name" or "owner/name")
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class PartRef:
    name: str  # "owner/name"
    version: int
    weight: float


@dataclass(frozen=True, slots=True)
class ResolvedParts:
    parts: tuple[AdapterPart, ...]  # what the engine gets (empty when `adapter` is set)
    adapter: str | None  # one part of weight 1: the plain adapter's pool key
    refs: tuple[PartRef, ...]  # for the response
    label: str  # every part's "owner/name", joined by "+": the metrics / usage label
    shared: bool  # some part is another tenant's shared adapter


def check_specs(specs: list[PartSpec], limit: int) -> None:
    """InvalidRequest before any lookup: no part, more than `limit`, an empty name, a bad weight."""
    if not specs:
        raise InvalidRequest("'adapters' is empty: name at least one adapter, or leave it out")
    if len(specs) > limit:
        raise InvalidRequest(f"a request may compose at most {limit} adapters, got {len(specs)}")
    for i, spec in enumerate(specs):
        if not spec.name:
            raise InvalidRequest(f"adapters[{i}].name must be a non-empty adapter name")
        if not math.isfinite(spec.weight) or abs(spec.weight) > MAX_PART_WEIGHT:
            raise InvalidRequest(f"adapters[{i}].weight must be a finite number in [-{MAX_PART_WEIGHT:g}, "
                                 f"{MAX_PART_WEIGHT:g}], got {spec.weight}")


def resolve_parts(registry, tenant, specs: list[PartSpec], limit: int) -> ResolvedParts:
    """Each part through registry.resolve (raises what it raises for an unknown or forbidden name)."""
    check_specs(specs, limit)
    parts, refs, shared = [], [], False
    for i, spec in enumerate(specs):
        resolved = registry.resolve(tenant, spec.name)
        if any(p.key == resolved.pool_key for p in parts):
            raise InvalidRequest(f"adapters[{i}] ({clip(spec.name)}) repeats an adapter; name each part once")
        parts.append(AdapterPart(resolved.pool_key, float(spec.weight)))
        refs.append(PartRef(f"{resolved.tenant}/{resolved.name}", resolved.version, float(spec.weight)))
        shared = shared or resolved.shared
    label = "+".join(r.name for r in refs)
    if len(parts) == 1 and parts[0].weight == 1.0:
        return ResolvedParts((), parts[0].key, tuple(refs), label, shared)
    return ResolvedParts(tuple(parts), None, tuple(refs), label, shared)


def parse_json(value: object) -> list[PartSpec]:
    """The HTTP body's `adapters`: [{"name": str, "weight": number (default 1)}, ...]; InvalidRequest otherwise."""
    if not isinstance(value, list):
        raise InvalidRequest("'adapters' must be a list of {\"name\": ..., \"weight\": ...} objects")
    specs = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidRequest(f"adapters[{i}] must be an object with 'name' and an optional 'weight'")
        name, weight = item.get("name"), item.get("weight", 1.0)
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"adapters[{i}].name must be a non-empty string")
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise InvalidRequest(f"adapters[{i}].weight must be a number, got {type(weight).__name__}")
        specs.append(PartSpec(name, float(weight)))
    return specs
