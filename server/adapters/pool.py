"""Adapter residency: registered sources -> host copies -> device slots (pinned while in use).

A simple pool: N device slots; an adapter is loaded on first use (synchronously, on the caller's
thread); when no slot is free the least recently used adapter with no running sequence is
evicted. Prompt/prefix adapters also take a slot, so every resident adapter is accounted for the
same way; their tensors are used from the host copy.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.adapters.slots import AdapterTables
from server.adapters.weights import AdapterKind, AdapterWeights
from server.config import AdapterPoolConfig
from server.model.args import ModelArgs

Reader = Callable[[Path], AdapterWeights]


class UnknownAdapter(KeyError):
    pass


@dataclass(slots=True)
class Lease:
    """What a running sequence holds: its slot and the adapter's tensors."""

    key: str
    slot: int
    weights: AdapterWeights
    version: int


@dataclass(slots=True)
class _Entry:
    source: Path | AdapterWeights
    version: int
    weights: AdapterWeights | None = None  # host copy
    slot: int | None = None
    refs: int = 0
    retired: bool = False  # unregistered while in use: dropped when the last lease is released
    meta: dict = field(default_factory=dict)


class AdapterPool:
    def __init__(self, cfg: AdapterPoolConfig, args: ModelArgs, dtype: torch.dtype, device: str,
                 reader: Reader | None = None) -> None:
        self.cfg = cfg
        self.args = args
        self.tables = AdapterTables(args, cfg.device_slots, cfg.max_lora_rank, dtype, device)
        self._reader = reader
        self._entries: dict[str, _Entry] = {}
        self._slot_owner: list[str | None] = [None] * cfg.device_slots
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident keys, least recent first
        self._lock = threading.RLock()
        self.loads = 0

    def register(self, key: str, source: Path | AdapterWeights, version: int = 1) -> None:
        with self._lock:
            old = self._entries.get(key)
            if old is not None and old.refs:
                raise ValueError(f"adapter key {key!r} is in use; register new versions under new keys")
            if old is not None:
                self._drop(key)
            self._entries[key] = _Entry(source, version)

    def unregister(self, key: str) -> None:
        """New requests can no longer use `key`; sequences holding it keep it until they finish."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            if entry.refs:
                entry.retired = True
            else:
                self._drop(key)

    def known(self, key: str) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and not entry.retired

    def host_weights(self, key: str) -> AdapterWeights:
        """Read (and cache) the adapter on the host; raises what the reader raises on a bad adapter."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.retired:
                raise UnknownAdapter(key)
            if entry.weights is None:
                src = entry.source
                if isinstance(src, AdapterWeights):
                    entry.weights = src
                else:
                    if self._reader is None:
                        raise RuntimeError("the pool has no adapter reader for paths")
                    entry.weights = self._reader(src)
            return entry.weights

    def acquire(self, key: str) -> Lease | None:
        """Pin `key` in a device slot (loading it if needed); None when every slot is pinned."""
        with self._lock:
            weights = self.host_weights(key)
            entry = self._entries[key]
            if entry.slot is None:
                slot = self._free_slot()
                if slot is None:
                    return None
                self._load(slot, weights)
                entry.slot = slot
                self._slot_owner[slot] = key
                self.loads += 1
            entry.refs += 1
            self._lru[key] = None
            self._lru.move_to_end(key)
            return Lease(key, entry.slot, weights, entry.version)

    def release(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            entry.refs -= 1
            if entry.refs == 0 and entry.retired:
                self._drop(key)

    def resident(self) -> int:
        with self._lock:
            return sum(owner is not None for owner in self._slot_owner)

    def _free_slot(self) -> int | None:
        for slot, owner in enumerate(self._slot_owner):
            if owner is None:
                return slot
        for key in self._lru:  # least recently used first
            entry = self._entries[key]
            if entry.refs == 0:
                slot = entry.slot
                self._evict(key)
                return slot
        return None

    def _load(self, slot: int, weights: AdapterWeights) -> None:
        if weights.kind is AdapterKind.LORA:
            self.tables.load_lora(slot, weights.lora)
        elif weights.kind is AdapterKind.IA3:
            self.tables.load_ia3(slot, weights.ia3)
        else:
            self.tables.clear(slot)

    def _evict(self, key: str) -> None:
        entry = self._entries[key]
        if entry.slot is not None:
            self.tables.clear(entry.slot)
            self._slot_owner[entry.slot] = None
            entry.slot = None
        self._lru.pop(key, None)

    def _drop(self, key: str) -> None:
        self._evict(key)
        del self._entries[key]
