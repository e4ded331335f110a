"""Merges: several stored adapters of one base combined into a new stored adapter (the Admin MergeAdapters call).

MergeSpec is the request (PEFT's `add_weighted_adapter` methods: linear, cat, svd, ties, dare_linear, dare_ties;
per-source weights, density, target rank, seed), checked here; the merge itself is the sources' kind's
(its `merge`, e.g. the LoRA family's server/adapters/kinds/lora_merge.py), which writes an adapter directory
that is then validated and stored like an upload.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.adapters.errors import AdapterRejected
from server.adapters.kinds import AdapterFormatError, by_name
from server.adapters.validation import check_scale
from server.clip import clip

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
MAX_SOURCES = 16  # a merge reads every source whole: bounded work and memory (issue 16 item 5)
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties")


@dataclass(frozen=True, slots=True)
class MergeSpec:
    method: str = "linear"
    weights: tuple[float, ...] | None = None  # one per source; None = all 1.0
    density: float | None = None  # ties / dare: fraction of entries kept, in (0, 1]
    target_rank: int | None = None  # svd: rank of the result (default: the largest source rank)
    seed: int | None = None  # dare: seed of the random masks (None = a fresh one)

    def check(self, n_sources: int) -> None:
        if self.method not in METHODS:
            raise AdapterRejected(f"merge method {self.method!r} is unknown; use one of {', '.join(METHODS)}")
        if n_sources < 1:
            raise AdapterRejected("a merge needs at least one source adapter")
        if n_sources > MAX_SOURCES:
            raise AdapterRejected(f"{n_sources} merge sources; at most {MAX_SOURCES} may be merged at once")
        if self.weights is not None and len(self.weights) != n_sources:
            raise AdapterRejected(f"{len(self.weights)} weights for {n_sources} sources; give one weight per source")
        for i, w in enumerate(self.weights or ()):
            _scale_ok(f"weights[{i}]", w)
        if self.density is not None:
            _scale_ok("density", self.density)
        if self.method in _NEEDS_DENSITY and (self.density is None or not 0 < self.density <= 1):
            raise AdapterRejected(f"method {self.method} needs a density in (0, 1], got {self.density}")
        if self.target_rank is not None and self.target_rank < 1:
            raise AdapterRejected(f"target_rank must be >= 1, got {self.target_rank}")


def _scale_ok(name: str, value: float) -> float:
    """A finite merge number within validation's bounds, else AdapterRejected naming it."""
    try:
        return check_scale(f"merge {name}", value)
    except AdapterFormatError as exc:
        raise AdapterRejected(str(exc)) from None


def merge_stored(registry, tenant, name: str, sources: list[str], spec: MergeSpec, *, shared: bool = False):
    """Merge adapters visible to `tenant` (newest versions) into a new stored adapter `name`; its AdapterInfo."""
    import shutil
    import uuid

    from server.adapters.store import STAGING

    spec.check(len(sources))
    read = [registry.read(tenant, src) for src in sources]
    keys = [resolved.pool_key for resolved, _ in read]
    for i, key in enumerate(keys):
        if key in keys[:i]:  # "x" and "owner/x" may name the same version
            raise AdapterRejected(f"merge source {clip(sources[i])} is given twice (as {clip(sources[keys.index(key)])}"
                                  f" too); use a weight instead of repeating a source")
    weights = [w for _, w in read]
    kind = by_name(weights[0].kind)  # its merge refuses a source of another kind, naming it
    scratch = registry.store.root / STAGING / f"merge-{uuid.uuid4().hex}"
    try:
        kind.merge(weights, spec, scratch)
        return registry.create(tenant, name, scratch, shared=shared)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
