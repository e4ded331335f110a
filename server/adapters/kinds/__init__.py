"""The registered adapter kinds. Adding a kind = one module implementing `AdapterKind` + one line below.

Order matters where kinds meet in one projection: their hooks run in registration order (IA3's input
and output scaling, then LoRA's addition), each on the rows of its own sequences only. Reading picks the
first kind whose `accepts(cfg)` is true (LoRA and DoRA share peft_type LORA; use_dora tells them apart).
Kinds of one family (AdapterKind.family: LoRA, DoRA, LongLoRA) share one table set and one StepAdapter, which
runs at the position of the family's first registered kind.
"""

from __future__ import annotations

from server.adapters.kinds.base import (
    AdapterFormatError,
    AdapterKind,
    AdapterLimits,
    BaseModelMismatch,
    ChunkView,
    ContextLayout,
    SlotTables,
)
from server.adapters.kinds.bitfit import BitFitKind
from server.adapters.kinds.bottleneck import BottleneckKind
from server.adapters.kinds.dora import DoraKind
from server.adapters.kinds.ia3 import IA3Kind
from server.adapters.kinds.longlora import LongLoraKind
from server.adapters.kinds.lora import LoraKind
from server.adapters.kinds.prefix import PrefixKind
from server.adapters.kinds.virtual import VirtualTokenKind

__all__ = ["AdapterFormatError", "AdapterKind", "BaseModelMismatch", "ChunkView", "ContextLayout", "AdapterLimits",
           "SlotTables", "by_config", "by_name", "by_peft_type", "family_of", "of_stored", "register", "registered",
           "unregister"]

_KINDS: dict[str, AdapterKind] = {}


def register(kind: AdapterKind) -> AdapterKind:
    """Make `kind` servable; pools created afterwards give it device tables."""
    if kind.name in _KINDS:
        raise ValueError(f"adapter kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    _KINDS.pop(name, None)


def registered() -> tuple[AdapterKind, ...]:
    return tuple(_KINDS.values())


def family_of(name: str) -> str:
    """The family of kind `name` (its own name when it has none, or when it is not registered)."""
    kind = _KINDS.get(name)
    return name if kind is None else kind.family_name


def by_name(name: str) -> AdapterKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise AdapterFormatError(f"adapter kind {name!r} is not served; served: {', '.join(_KINDS)}") from None


# Versions stored before the store recorded a kind (issue 8's adapter kinds) are all LoRA adapters: the one kind
# served then. The one place generic code meets a kind's name for stored metadata (of_stored).
LEGACY_KIND = "LORA"


def of_stored(meta: dict) -> AdapterKind:
    """The kind of a stored version from the metadata recorded with it (LEGACY_KIND when it records none)."""
    return by_name(meta.get("kind", LEGACY_KIND))


def by_config(cfg: dict) -> AdapterKind:
    """The kind that reads this adapter_config.json (several kinds may share a peft_type, e.g. LoRA and DoRA)."""
    for kind in _KINDS.values():
        if kind.accepts(cfg):
            return kind
    return by_peft_type(str(cfg.get("peft_type")))


def by_peft_type(peft_type: str) -> AdapterKind:
    for kind in _KINDS.values():
        if peft_type in kind.peft_types:
            return kind
    served = ", ".join(t for k in _KINDS.values() for t in k.peft_types)
    raise AdapterFormatError(f"peft_type {peft_type!r} is not served; served: {served}")


register(IA3Kind())
register(LongLoraKind())  # before LoRA: it reads the LoRA configs with modules_to_save / rope_scaling
register(LoraKind())
register(DoraKind())
register(VirtualTokenKind("PROMPT_TUNING"))
register(VirtualTokenKind("P_TUNING"))
register(PrefixKind())
register(BitFitKind())
register(BottleneckKind())
