"""The pool's host tier: adapters' host copies within a byte budget, least recently used out first.

Only the pool calls it, with the pool's lock held. A copy is dropped only from an entry that is ON_HOST
and idle (no slot, nobody running on it or waiting for it); the entry then goes back to ON_DISK.
"""

from __future__ import annotations

from collections import OrderedDict

from server.adapters.residency import Entry, EntryState
from server.adapters.weights import AdapterWeights


class HostCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self._lru: OrderedDict[str, None] = OrderedDict()  # keys with a host copy, least recent first

    def __len__(self) -> int:
        return len(self._lru)

    def touch(self, key: str) -> None:
        if key in self._lru:
            self._lru.move_to_end(key)

    def put(self, key: str, entry: Entry, weights: AdapterWeights, entries: dict[str, Entry]) -> None:
        """Give `entry` its host copy, then trim the others back within the budget."""
        entry.weights = weights
        entry.nbytes = weights.nbytes()
        self.bytes += entry.nbytes
        self._lru[key] = None
        self._lru.move_to_end(key)
        self.trim(entries)

    def trim(self, entries: dict[str, Entry]) -> None:
        """ON_HOST -> ON_DISK for the least recently used idle copies while over the budget."""
        for key in list(self._lru):
            if self.bytes <= self.budget_bytes:
                return
            entry = entries[key]
            if entry.state is EntryState.ON_HOST and entry.idle:
                self.drop(key, entry)
                entry.state = EntryState.ON_DISK

    def drop(self, key: str, entry: Entry) -> None:
        if entry.weights is not None:
            self.bytes -= entry.nbytes
            entry.weights, entry.nbytes = None, 0
        self._lru.pop(key, None)
