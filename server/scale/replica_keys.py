"""Which pool keys a replica keeps registered in its engine: every decision on the replica's event loop.

A key stays registered while any of these holds:
- Ray's multiplexed LRU holds it (resident),
- a request of this replica uses it (in use),
- the loader is reading it (loading).
Each method reports whether the key just stopped being any of them; the replica then unregisters it.

Ray's LRU unloads a key on an executor thread and the news reaches the loop afterwards, so it can arrive
after a reload of the same key started. Each load therefore has a generation, and an eviction only counts for
the generation it names: the late news of generation 1 does not unregister generation 2. Before this book a
request could find its key unregistered between its loader's return and its submit (64 requests over 8 keys
on 2 slots after a replica was killed).
"""

from __future__ import annotations

from collections import Counter


class ReplicaKeys:
    def __init__(self) -> None:
        self.resident: set[str] = set()  # keys Ray's LRU holds, as far as the loop has heard
        self.in_use: Counter[str] = Counter()  # key -> this replica's requests holding it
        self.loading: Counter[str] = Counter()  # key -> loads in progress
        self.generation: Counter[str] = Counter()  # key -> number of loads started
        self.loads: Counter[str] = Counter()  # key -> loads that finished

    def load_started(self, key: str) -> int:
        """Ray's LRU missed `key` (so it does not hold it now): a load begins; its generation."""
        self.resident.discard(key)
        self.loading[key] += 1
        self.generation[key] += 1
        return self.generation[key]

    def load_ended(self, key: str, ok: bool) -> bool:
        """The load finished (ok: Ray's LRU holds it now) or failed; True: unregister `key`."""
        self.loading[key] -= 1
        if ok:
            self.resident.add(key)
            self.loads[key] += 1
        return self._unused(key)

    def evicted(self, key: str, generation: int) -> bool:
        """Ray's LRU let go of the load of that generation; True: unregister `key`."""
        if generation != self.generation[key]:
            return False  # a later load owns the key now
        self.resident.discard(key)
        return self._unused(key)

    def forget(self, key: str) -> bool:
        """The key's version was deleted: no longer counted resident; True: unregister `key`."""
        self.resident.discard(key)
        return self._unused(key)

    def acquire(self, key: str) -> None:
        self.in_use[key] += 1

    def release(self, key: str) -> bool:
        """A request holding `key` ended; True: unregister `key`."""
        self.in_use[key] -= 1
        return self._unused(key)

    def _unused(self, key: str) -> bool:
        unused = key not in self.resident and not self.in_use[key] and not self.loading[key]
        if unused:
            self.in_use.pop(key, None)
            self.loading.pop(key, None)
        return unused
