"""What the pool knows about one registered adapter: its state, and the records it hands out.

An entry's life (the pool's lock guards every change):

    ON_DISK --load requested--> LOADING            (a loader job is queued or running)
    ON_HOST --slot wanted-----> LOADING
    LOADING --read failed-----> FAILED             (its requests fail; re-registering starts over)
    LOADING --no slot wanted or none free--> ON_HOST
    LOADING --slot claimed----> FILLING            (copy into the reserved slot, outside the lock)
    FILLING --copied----------> IN_SLOT
    FILLING --copy failed-----> FAILED
    FILLING --evicted/dropped-> ON_HOST / gone     (the filler gives the slot back when it finishes)
    IN_SLOT --evicted---------> ON_HOST            (least recently used, pinned by nobody, wanted by nobody)
    ON_HOST --host copy trimmed--> ON_DISK         (host LRU by bytes)

Orthogonal to the state: `pins` (running sequences reading the slot), `users` (submitted, unfinished
sequences) and `retired` (unregistered while in use: dropped when the last user and pin are gone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from server.adapters import kinds
from server.adapters.kinds import ContextLayout
from server.adapters.weights import AdapterWeights

Source = Path | AdapterWeights | Callable[[], AdapterWeights]


class EntryState(Enum):
    ON_DISK = "on_disk"
    LOADING = "loading"
    ON_HOST = "on_host"
    FILLING = "filling"
    IN_SLOT = "in_slot"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class AdapterMeta:
    """What the engine needs at submit time, known without loading tensors."""

    kind: str
    layout: ContextLayout = ContextLayout()

    @classmethod
    def of(cls, weights: AdapterWeights) -> AdapterMeta:
        return cls(weights.kind, weights.layout)

    @classmethod
    def stored(cls, meta: dict) -> AdapterMeta:
        """From the metadata recorded with a stored version (kind, num_virtual_tokens), without reading it."""
        kind = kinds.of_stored(meta)
        return cls(kind.name, kind.layout(int(meta.get("num_virtual_tokens", 0))))


@dataclass(slots=True)
class Lease:
    """What a running sequence holds: its adapter slot and the adapter's (host) tensors."""

    key: str
    adapter_slot: int
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
class Entry:
    source: Source  # a path, weights in memory, or a loader callable
    version: int
    meta: AdapterMeta | None
    state: EntryState = EntryState.ON_DISK
    weights: AdapterWeights | None = None  # host copy (ON_HOST, FILLING, IN_SLOT; LOADING may have one)
    nbytes: int = 0
    adapter_slot: int | None = None  # reserved (FILLING) or ready (IN_SLOT)
    want_slot: bool = False  # acquire() asked for a slot (besides submitted users)
    displace: bool = False  # ...for a composition's part: it may evict a waiting request's unpinned adapter
    pins: int = 0
    users: int = 0
    retired: bool = False
    error: str | None = None  # why it FAILED
    digest: str = ""  # content digest of the version's bytes, or a token unique to this registration
    shared: bool = False  # visible to other tenants (their prefix-cache blocks may be shared when the operator says)

    @property
    def idle(self) -> bool:
        """Nobody runs on it or waits for it."""
        return self.pins == 0 and self.users == 0
