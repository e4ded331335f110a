"""Adapter residency in three tiers: disk (registered sources) -> host memory (LRU by bytes) -> device slots.

- Any number of adapters can be registered; a source is a path, a loader callable, or weights in memory.
- Reading from disk, validating, preparing the host copy (dtype conversion, pinned memory) and copying
  it into a free device slot all happen on the pool's loader thread, never on the engine's step loop.
  `reserve()` (at submit) starts that work early; `acquire()` (step loop) returns None while it is in
  flight, so the request waits and the other sequences keep decoding; once the slot is ready, acquire()
  only pins it. A slot being filled belongs to no running sequence, so nothing reads it meanwhile; the
  new module tables the copy may create are only ever added, never replaced.
- Device slots are fixed in number; the least recently used adapter that no running or waiting sequence
  needs is evicted. Host copies are kept within `host_cache_bytes` the same way (host_cache.py).
- Every kind takes a slot (prompt/prefix kinds keep nothing on the device but are accounted the same).
Entry states and their transitions: server/adapters/residency.py.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from server.adapters import kinds
from server.adapters.errors import AdapterNotFound
from server.adapters.host_cache import HostCache
from server.adapters.residency import AdapterMeta, Entry, EntryState, Lease, PoolStats, Source
from server.adapters.slots import AdapterTables
from server.adapters.weights import AdapterWeights
from server.config import AdapterPoolConfig
from server.model.args import ModelArgs

log = logging.getLogger(__name__)

Reader = Callable[[Path], AdapterWeights]
__all__ = ["AdapterLoadError", "AdapterMeta", "AdapterPool", "Lease", "PoolStats", "UnknownAdapter"]


class UnknownAdapter(AdapterNotFound, KeyError):
    """The key is not registered (or was unregistered)."""


class AdapterLoadError(RuntimeError):
    """Reading or validating the adapter failed; the message says why."""


class AdapterPool:
    def __init__(self, cfg: AdapterPoolConfig, args: ModelArgs, dtype: torch.dtype, device: str,
                 reader: Reader | None = None) -> None:
        self.cfg = cfg
        self.args = args
        self.limits = cfg.limits  # what every reader, header check and kind of this pool's adapters is held to
        if self.limits.lora_torch_dtype not in (None, dtype) and not str(device).startswith("cpu"):
            raise ValueError(f"lora_dtype={cfg.lora_dtype} on a {dtype} model is served on CPU only "
                             "(the Triton kernels take one dtype)")
        self.tables = AdapterTables(args, cfg.device_slots, self.limits, dtype, device)
        self.reader = reader
        self._entries: dict[str, Entry] = {}
        self._slot_owner: list[str | None] = [None] * cfg.device_slots
        self._lru: OrderedDict[str, None] = OrderedDict()  # IN_SLOT keys, least recent first
        self._host = HostCache(cfg.host_cache_bytes)
        self._lock = threading.RLock()
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._loader: threading.Thread | None = None
        self.loads = 0
        self.disk_loads = 0
        self.max_slot_copy_s = 0.0
        # called (pool lock held, any thread) with the cache identity of a dropped version no other entry shares
        self.on_drop: Callable[[str], None] | None = None

    # ---- registration (any thread) -------------------------------------------------------------
    def register(self, key: str, source: Source, version: int = 1, *, meta: AdapterMeta | None = None,
                 weights: AdapterWeights | None = None, digest: str | None = None, shared: bool = False) -> None:
        """Make `key` usable. `weights` (already validated) seeds the host copy; `meta` avoids a read at submit;
        `digest` (of the version's stored bytes) lets the prefix cache share K/V between registrations of the
        same content: without one, this registration's blocks are its own. `shared`: other tenants may use it."""
        if isinstance(source, AdapterWeights):
            weights = weights or source
        if weights is not None:
            meta = meta or AdapterMeta.of(weights)
        with self._lock:
            old = self._entries.get(key)
            if old is not None and not old.idle:
                raise ValueError(f"adapter key {key!r} is in use; register new versions under new keys")
            if old is not None:
                self._drop(key)
            entry = Entry(source, version, meta, digest=f"sha256:{digest}" if digest else f"once:{uuid.uuid4().hex}",
                          shared=shared)
            self._entries[key] = entry
            if weights is not None:
                self._set_host(key, entry, self.tables.staged(weights))
                entry.state = EntryState.ON_HOST

    def unregister(self, key: str) -> None:
        """New requests can no longer use `key`; sequences already holding it keep it until they finish."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            if entry.idle:
                self._drop(key)
            else:
                entry.retired = True

    def revive(self, key: str) -> bool:
        """Undo unregister() for a key still held by its sequences; True when `key` is registered now."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.retired = False
            return entry is not None

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
            if entry.state is EntryState.IN_SLOT:
                return "device"
            return "host" if entry.weights is not None else "disk"

    # ---- submit side (caller threads) ----------------------------------------------------------
    def meta(self, key: str) -> AdapterMeta:
        """Kind and context layout; reads the adapter (on this thread) only if nobody said them."""
        with self._lock:
            entry = self._live(key)
            if entry.meta is not None:
                return entry.meta
        weights = self.host_weights(key)
        with self._lock:
            entry.meta = AdapterMeta.of(weights)
            return entry.meta

    def composable(self, key: str) -> tuple[str, bool]:
        """The adapter's kind name, and whether its kind may be weighted and composed with others."""
        kind = self.meta(key).kind
        return kind, kinds.by_name(kind).composable

    def cache_identity(self, key: str) -> tuple[str, bool]:
        """What the prefix cache keys this version's KV blocks by (its kind and content digest), and whether
        other tenants may use the version."""
        kind = self.meta(key).kind
        with self._lock:
            entry = self._live(key)
            return f"{kind}:{entry.digest}", entry.shared

    def reserve(self, key: str) -> None:
        """A submitted sequence will use `key`: keep it registered for it and start loading it to host."""
        with self._lock:
            entry = self._live(key)
            entry.users += 1
            self._request_load(key, entry)

    def unreserve(self, key: str) -> None:
        """The submitted sequence finished (or was aborted)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.users = max(0, entry.users - 1)
                self._drop_if_retired(key, entry)

    def host_weights(self, key: str) -> AdapterWeights:
        """The host copy, read on the calling thread if needed; raises what the reader raises."""
        with self._lock:
            entry = self._live(key)
            if entry.weights is not None:
                self._host.touch(key)
                return entry.weights
            source = entry.source
        weights = self.tables.staged(self._read(source))
        with self._lock:
            if entry.weights is None and self._entries.get(key) is entry:
                self._set_host(key, entry, weights)
                if entry.state is EntryState.ON_DISK:
                    entry.state = EntryState.ON_HOST
            return entry.weights if entry.weights is not None else weights

    # ---- step loop -----------------------------------------------------------------------------
    def acquire(self, key: str, displace: bool = False) -> Lease | None:
        """Pin `key` in its device slot; None while the loader brings it in, or when every slot is pinned.
        displace: a composition's part (server/engine/composition.py), which may take the slot of an adapter that
        only waiting requests hold when no slot is free.

        Never reads or copies tensors itself. Raises UnknownAdapter when the key is gone,
        AdapterLoadError when its load failed."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise UnknownAdapter(key)
            if entry.state is EntryState.FAILED:
                raise AdapterLoadError(entry.error)
            if entry.state is not EntryState.IN_SLOT:
                entry.want_slot = True
                entry.displace = entry.displace or displace
                self._request_load(key, entry)
                return None
            entry.pins += 1
            self._lru.move_to_end(key)
            self._host.touch(key)
            return Lease(key, entry.adapter_slot, entry.weights, entry.version)

    def release(self, key: str) -> None:
        """The running sequence no longer needs its slot (finished or preempted)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.pins = max(0, entry.pins - 1)
                self._drop_if_retired(key, entry)

    def resident(self) -> int:
        with self._lock:
            return sum(owner is not None for owner in self._slot_owner)

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(len(self._entries), len(self._host), self._host.bytes, self.resident(), self.loads,
                             self.disk_loads, self.max_slot_copy_s)

    def close(self) -> None:
        if self._loader is not None:
            self._queue.put(None)
            self._loader.join(timeout=10)
            self._loader = None

    # ---- the loader thread ---------------------------------------------------------------------
    def _request_load(self, key: str, entry: Entry) -> None:
        """ON_DISK / ON_HOST -> LOADING: queue a job to read it to host and fill a slot if one is wanted."""
        if entry.state not in (EntryState.ON_DISK, EntryState.ON_HOST):
            return
        entry.state = EntryState.LOADING
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
            if entry is None or entry.state is not EntryState.LOADING:
                return
            source, weights = entry.source, entry.weights
        if weights is None:
            try:
                weights = self.tables.staged(self._read(source))
            except Exception as exc:  # a bad adapter fails its requests, never the loader
                log.warning("loading adapter %s failed: %s", key, exc)
                self._fail(key, entry, f"adapter {key!r} could not be loaded: {exc}")
                return
        with self._lock:
            if self._entries.get(key) is not entry or entry.state is not EntryState.LOADING:
                return  # dropped, re-registered or evicted meanwhile
            if entry.weights is None:
                self._set_host(key, entry, weights)
            slot = self._claim_slot(key, entry)
            if slot is None:
                entry.state = EntryState.ON_HOST
                return
        self._fill_slot(key, entry, slot, weights)

    def _fail(self, key: str, entry: Entry, error: str) -> None:
        with self._lock:
            if self._entries.get(key) is entry:
                entry.state, entry.error = EntryState.FAILED, error

    def _claim_slot(self, key: str, entry: Entry) -> int | None:
        """LOADING -> FILLING: a free (or freed) slot reserved for `entry` if a sequence wants it; lock held."""
        if not (entry.users or entry.want_slot):
            return None
        slot = self._free_slot(displace=entry.displace)
        if slot is not None:
            entry.state, entry.adapter_slot, entry.want_slot, entry.displace = EntryState.FILLING, slot, False, False
            self._slot_owner[slot] = key
            self.tables.ensure(entry.weights)  # no table is added without the lock
        return slot

    def _fill_slot(self, key: str, entry: Entry, slot: int, weights: AdapterWeights) -> None:
        """FILLING -> IN_SLOT: copy into the reserved slot without the lock (nothing reads a slot no one holds)."""
        start = time.perf_counter()
        try:
            self.tables.fill(slot, weights)
        except Exception as exc:
            with self._lock:
                self._give_back(slot)
                if entry.adapter_slot == slot:
                    entry.adapter_slot = None
            self._fail(key, entry, f"adapter {key!r} could not be copied into a device slot: {exc}")
            raise
        elapsed = time.perf_counter() - start
        with self._lock:
            self.loads += 1
            self.max_slot_copy_s = max(self.max_slot_copy_s, elapsed)
            if self._entries.get(key) is entry and entry.adapter_slot == slot:
                entry.state = EntryState.IN_SLOT
                self._lru[key] = None
            else:  # dropped or evicted while copying: give the slot back
                self._give_back(slot)

    def _read(self, source: Source) -> AdapterWeights:
        if isinstance(source, AdapterWeights):
            return source
        self.disk_loads += 1
        if isinstance(source, Path | str):
            if self.reader is None:
                raise RuntimeError("the pool has no adapter reader for paths")
            return self.reader(Path(source))
        return source()

    # ---- internals (lock held) -----------------------------------------------------------------
    def _live(self, key: str) -> Entry:
        entry = self._entries.get(key)
        if entry is None or entry.retired:
            raise UnknownAdapter(key)
        return entry

    def _set_host(self, key: str, entry: Entry, weights: AdapterWeights) -> None:
        entry.meta = entry.meta or AdapterMeta.of(weights)
        self._host.put(key, entry, weights, self._entries)

    def _free_slot(self, displace: bool = False) -> int | None:
        for slot, owner in enumerate(self._slot_owner):
            if owner is None:
                return slot
        # least recently used first, and never one that a submitted request still needs: it is about to run
        # (evicting it for another waiting adapter would only make the two take turns copying in)
        for key in self._lru:
            entry = self._entries[key]
            if entry.idle:
                slot = entry.adapter_slot
                self._evict(key, entry)
                return slot
        # a composition's part is being admitted and every slot is held by waiting requests: it could wait for a
        # slot that only other waiting requests' parts hold (two compositions each holding half of what they
        # need, forever), so the least recently used unpinned adapter gives way
        for key in self._lru if displace else ():
            entry = self._entries[key]
            if entry.pins == 0:
                slot = entry.adapter_slot
                self._evict(key, entry)
                return slot
        return None

    def _give_back(self, slot: int) -> None:
        self.tables.clear(slot)
        self._slot_owner[slot] = None

    def _evict(self, key: str, entry: Entry) -> None:
        """IN_SLOT -> ON_HOST (FILLING -> ON_HOST: the filler gives the slot back when its copy ends)."""
        if entry.state is EntryState.IN_SLOT:
            self._give_back(entry.adapter_slot)
        if entry.state in (EntryState.IN_SLOT, EntryState.FILLING):
            entry.state = EntryState.ON_HOST
        entry.adapter_slot = None
        self._lru.pop(key, None)
        self._host.trim(self._entries)

    def _drop_if_retired(self, key: str, entry: Entry) -> None:
        if entry.retired and entry.idle:
            self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self._entries[key]
        self._evict(key, entry)
        self._host.drop(key, entry)
        del self._entries[key]
        if self.on_drop is not None and entry.meta is not None and all(
                e.digest != entry.digest for e in self._entries.values()):
            self.on_drop(f"{entry.meta.kind}:{entry.digest}")
