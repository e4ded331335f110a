"""Adapter residency in three tiers: disk (registered sources) -> host memory (LRU by bytes) -> device slots.

- Any number of adapters can be registered; a source is a path, a loader callable, or weights in memory.
- Reading from disk, validating, preparing the host copy (dtype conversion, pinned memory) and copying
  it into a free device slot all happen on the pool's loader thread, never on the engine's step loop.
  `reserve()` (at submit) starts that work early; `acquire()` (step loop) returns None while it is in
  flight, so the request waits and the other sequences keep decoding; once the slot is ready, acquire()
  only pins it. A slot being filled belongs to no running sequence, so nothing reads it meanwhile; the
  new module tables the copy may create are only ever added, never replaced.
- Device slots are fixed in number; the least recently used adapter that no running or waiting sequence
  needs is evicted.
- Host copies are kept within `host_cache_bytes`, evicting the least recently used copies that are
  neither in a slot nor wanted by a submitted sequence.
- Prompt/prefix adapters also take a slot, so every resident adapter is accounted for the same way;
  their tensors are used from the host copy.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from server.adapters.errors import AdapterNotFound
from server.adapters.slots import AdapterTables
from server.adapters.weights import AdapterKind, AdapterWeights
from server.config import AdapterPoolConfig
from server.model.args import ModelArgs

log = logging.getLogger(__name__)

Reader = Callable[[Path], AdapterWeights]
Source = Path | AdapterWeights | Callable[[], AdapterWeights]


class UnknownAdapter(AdapterNotFound, KeyError):
    """The key is not registered (or was unregistered)."""


class AdapterLoadError(RuntimeError):
    """Reading or validating the adapter failed; the message says why."""


@dataclass(frozen=True, slots=True)
class AdapterMeta:
    """What the engine needs at submit time, known without loading tensors."""

    kind: AdapterKind
    num_virtual_tokens: int = 0

    @classmethod
    def of(cls, weights: AdapterWeights) -> AdapterMeta:
        return cls(weights.kind, weights.num_virtual_tokens)


@dataclass(slots=True)
class Lease:
    """What a running sequence holds: its slot and the adapter's tensors."""

    key: str
    slot: int
    weights: AdapterWeights
    version: int


@dataclass(frozen=True, slots=True)
class PoolStats:
    registered: int
    host_entries: int
    host_bytes: int
    device_resident: int
    loads: int  # host -> slot copies (on the loader thread)
    disk_loads: int  # disk -> host reads (on the loader thread)
    max_slot_copy_s: float  # longest host -> slot copy (on the loader thread, not the step loop)


@dataclass(slots=True)
class _Entry:
    source: Source
    version: int
    meta: AdapterMeta | None
    weights: AdapterWeights | None = None  # host copy
    nbytes: int = 0
    slot: int | None = None
    slot_ready: bool = False  # False while the loader copies into `slot`
    want_slot: bool = False  # acquire() asked for a slot (besides submitted users)
    refs: int = 0  # running sequences pinning the slot
    users: int = 0  # submitted, unfinished sequences (waiting or running)
    retired: bool = False  # unregistered while in use: dropped when the last user is gone
    loading: bool = False  # a loader job (host read and/or slot copy) is queued or running
    error: str | None = None  # the last load failure


class AdapterPool:
    def __init__(self, cfg: AdapterPoolConfig, args: ModelArgs, dtype: torch.dtype, device: str,
                 reader: Reader | None = None) -> None:
        self.cfg = cfg
        self.args = args
        self.tables = AdapterTables(args, cfg.device_slots, cfg.max_lora_rank, dtype, device)
        self.reader = reader
        self._entries: dict[str, _Entry] = {}
        self._slot_owner: list[str | None] = [None] * cfg.device_slots
        self._lru: OrderedDict[str, None] = OrderedDict()  # slot-resident keys, least recent first
        self._host_lru: OrderedDict[str, None] = OrderedDict()  # host copies, least recent first
        self._host_bytes = 0
        self._lock = threading.RLock()
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._loader: threading.Thread | None = None
        self.loads = 0
        self.disk_loads = 0
        self.max_slot_copy_s = 0.0

    # ---- registration (any thread) -------------------------------------------------------------
    def register(self, key: str, source: Source, version: int = 1, *, meta: AdapterMeta | None = None,
                 weights: AdapterWeights | None = None) -> None:
        """Make `key` usable. `weights` (already validated) seeds the host copy; `meta` avoids a read at submit."""
        if isinstance(source, AdapterWeights):
            weights = weights or source
        if weights is not None:
            meta = meta or AdapterMeta.of(weights)
        with self._lock:
            old = self._entries.get(key)
            if old is not None and (old.refs or old.users):
                raise ValueError(f"adapter key {key!r} is in use; register new versions under new keys")
            if old is not None:
                self._drop(key)
            entry = _Entry(source, version, meta)
            self._entries[key] = entry
            if weights is not None:
                self._set_host(key, entry, self._prepare(weights))

    def unregister(self, key: str) -> None:
        """New requests can no longer use `key`; sequences already holding it keep it until they finish."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            if entry.refs or entry.users:
                entry.retired = True
            else:
                self._drop(key)

    def known(self, key: str) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and not entry.retired

    def residency(self, key: str) -> str:
        """'device' (in a slot), 'host' (in memory) or 'disk' (registered, not loaded, or unknown)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return "disk"
            if entry.slot is not None and entry.slot_ready:
                return "device"
            return "host" if entry.weights is not None else "disk"

    # ---- submit side (caller threads) ----------------------------------------------------------
    def meta(self, key: str) -> AdapterMeta:
        """Kind and virtual-token count; reads the adapter (on this thread) only if nobody said them."""
        with self._lock:
            entry = self._live(key)
            if entry.meta is not None:
                return entry.meta
        weights = self.host_weights(key)
        with self._lock:
            entry.meta = AdapterMeta.of(weights)
            return entry.meta

    def reserve(self, key: str) -> None:
        """A submitted sequence will use `key`: keep it registered for it and start loading it to host."""
        with self._lock:
            entry = self._live(key)
            entry.users += 1
            self._request_load(key, entry)

    def unreserve(self, key: str) -> None:
        """The submitted sequence finished (or was aborted)."""
        self._let_go(key, "users")

    def host_weights(self, key: str) -> AdapterWeights:
        """The host copy, read on the calling thread if needed; raises what the reader raises."""
        with self._lock:
            entry = self._live(key)
            if entry.weights is not None:
                self._host_lru.move_to_end(key)
                return entry.weights
            source = entry.source
        weights = self._prepare(self._read(source))
        with self._lock:
            if entry.weights is None and self._entries.get(key) is entry:
                self._set_host(key, entry, weights)
            return entry.weights if entry.weights is not None else weights

    # ---- step loop -----------------------------------------------------------------------------
    def acquire(self, key: str) -> Lease | None:
        """Pin `key` in its device slot; None while the loader brings it in, or when every slot is pinned.

        Never reads or copies tensors itself. Raises UnknownAdapter when the key is gone,
        AdapterLoadError when its load failed."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise UnknownAdapter(key)
            if entry.error is not None:
                raise AdapterLoadError(entry.error)
            if entry.slot is None or not entry.slot_ready:
                entry.want_slot = True
                self._request_load(key, entry)
                return None
            entry.refs += 1
            self._lru[key] = None
            self._lru.move_to_end(key)
            self._host_lru.move_to_end(key)
            return Lease(key, entry.slot, entry.weights, entry.version)

    def release(self, key: str) -> None:
        """The running sequence no longer needs its slot (finished or preempted)."""
        self._let_go(key, "refs")

    def resident(self) -> int:
        with self._lock:
            return sum(owner is not None for owner in self._slot_owner)

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(len(self._entries), len(self._host_lru), self._host_bytes, self.resident(), self.loads,
                             self.disk_loads, self.max_slot_copy_s)

    def close(self) -> None:
        if self._loader is not None:
            self._queue.put(None)
            self._loader.join(timeout=10)
            self._loader = None

    # ---- the loader thread ---------------------------------------------------------------------
    def _request_load(self, key: str, entry: _Entry) -> None:
        """Queue a loader job for `key`: read it to host if needed, then fill a slot if one is wanted."""
        if entry.loading or entry.error is not None or (entry.weights is not None and entry.slot is not None):
            return
        entry.loading = True
        if self._loader is None:
            self._loader = threading.Thread(target=self._load_loop, name="adapter-loader", daemon=True)
            self._loader.start()
        self._queue.put(key)

    def _load_loop(self) -> None:
        while (key := self._queue.get()) is not None:
            try:
                self._load_one(key)
            except Exception:  # one adapter never stops the loader
                log.exception("the adapter loader failed on %s", key)

    def _load_one(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not entry.loading:
                return
            source, weights = entry.source, entry.weights
        if weights is None:
            try:
                weights = self._prepare(self._read(source))
            except Exception as exc:  # a bad adapter fails its requests, never the loader
                log.warning("loading adapter %s failed: %s", key, exc)
                self._fail(key, entry, f"adapter {key!r} could not be loaded: {exc}")
                return
        with self._lock:
            if self._entries.get(key) is not entry:
                return  # dropped or re-registered meanwhile
            if entry.weights is None:
                self._set_host(key, entry, weights)
            slot = self._claim_slot(key, entry)
            if slot is None:
                entry.loading = False
                return
        self._fill_slot(key, entry, slot, weights)

    def _fail(self, key: str, entry: _Entry, error: str) -> None:
        with self._lock:
            if self._entries.get(key) is entry:
                entry.loading = False
                entry.error = error

    def _claim_slot(self, key: str, entry: _Entry) -> int | None:
        """A free (or freed) slot reserved for `entry` if a sequence wants it; lock held."""
        if entry.slot is not None or not (entry.users or entry.want_slot):
            return None
        slot = self._free_slot()
        if slot is not None:
            entry.slot, entry.slot_ready, entry.want_slot = slot, False, False
            self._slot_owner[slot] = key
            self.tables.ensure_tables(entry.weights.lora, entry.weights.ia3)  # no table is added without the lock
        return slot

    def _fill_slot(self, key: str, entry: _Entry, slot: int, weights: AdapterWeights) -> None:
        """Copy into the reserved slot without the lock (nothing reads a slot no sequence holds)."""
        start = time.perf_counter()
        try:
            self._load_slot(slot, weights)
        except Exception as exc:
            with self._lock:
                self.tables.clear(slot)
                self._slot_owner[slot] = None
                if entry.slot == slot:
                    entry.slot = None
            self._fail(key, entry, f"adapter {key!r} could not be copied into a device slot: {exc}")
            raise
        elapsed = time.perf_counter() - start
        with self._lock:
            entry.loading = False
            self.loads += 1
            self.max_slot_copy_s = max(self.max_slot_copy_s, elapsed)
            if self._entries.get(key) is entry and entry.slot == slot:
                entry.slot_ready = True
                self._lru[key] = None
            else:  # dropped while copying: give the slot back
                self.tables.clear(slot)
                self._slot_owner[slot] = None

    def _read(self, source: Source) -> AdapterWeights:
        if isinstance(source, AdapterWeights):
            return source
        self.disk_loads += 1
        if isinstance(source, Path | str):
            if self.reader is None:
                raise RuntimeError("the pool has no adapter reader for paths")
            return self.reader(Path(source))
        return source()

    def _prepare(self, weights: AdapterWeights) -> AdapterWeights:
        return self.tables.staged(weights)

    # ---- internals (lock held) -----------------------------------------------------------------
    def _live(self, key: str) -> _Entry:
        entry = self._entries.get(key)
        if entry is None or entry.retired:
            raise UnknownAdapter(key)
        return entry

    def _set_host(self, key: str, entry: _Entry, weights: AdapterWeights) -> None:
        entry.weights = weights
        entry.nbytes = weights.nbytes()
        entry.meta = entry.meta or AdapterMeta.of(weights)
        self._host_bytes += entry.nbytes
        self._host_lru[key] = None
        self._host_lru.move_to_end(key)
        self._trim_host()

    def _trim_host(self) -> None:
        for key in list(self._host_lru):
            if self._host_bytes <= self.cfg.host_cache_bytes:
                return
            entry = self._entries[key]
            if entry.slot is None and not entry.refs and not entry.users:
                self._drop_host(key, entry)

    def _drop_host(self, key: str, entry: _Entry) -> None:
        if entry.weights is not None:
            self._host_bytes -= entry.nbytes
            entry.weights, entry.nbytes = None, 0
        self._host_lru.pop(key, None)

    def _free_slot(self) -> int | None:
        for slot, owner in enumerate(self._slot_owner):
            if owner is None:
                return slot
        # least recently used first, and never one that a submitted request still needs: it is about to run
        # (evicting it for another waiting adapter would only make the two take turns copying in)
        for key in self._lru:
            entry = self._entries[key]
            if entry.refs == 0 and entry.users == 0:
                slot = entry.slot
                self._evict(key)
                return slot
        return None

    def _load_slot(self, slot: int, weights: AdapterWeights) -> None:
        if weights.kind is AdapterKind.LORA:
            self.tables.load_lora(slot, weights.lora)
        elif weights.kind is AdapterKind.IA3:
            self.tables.load_ia3(slot, weights.ia3)
        else:
            self.tables.clear(slot)

    def _evict(self, key: str) -> None:
        entry = self._entries[key]
        if entry.slot is not None:
            if entry.slot_ready:  # else the loader is filling it and gives it back when done
                self.tables.clear(entry.slot)
                self._slot_owner[entry.slot] = None
            entry.slot, entry.slot_ready = None, False
        self._lru.pop(key, None)
        self._trim_host()

    def _let_go(self, key: str, counter: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            setattr(entry, counter, max(0, getattr(entry, counter) - 1))
            if entry.retired and not entry.refs and not entry.users:
                self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self._entries[key]
        self._evict(key)
        self._drop_host(key, entry)
        entry.loading = False
        del self._entries[key]
