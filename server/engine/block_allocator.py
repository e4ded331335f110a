"""KV block bookkeeping: reference counts, the free list, and the prefix cache's index of full blocks.

Every block is in exactly one state:

    free    refs == 0, no key             in `_free` (a stack)
    cached  refs == 0, a key              in `_lru` (least recently released first): evictable
    held    refs  > 0, a key or none      owned by its holders (sequences)

A key is the content address of a full, computed block (server.engine.prefix_cache); `_index` maps each
key to the one block holding it, and a block has at most one key (`_key`). Its `tag` (the adapter identity)
lets a deleted adapter's blocks be dropped at once. A released keyed block stays cached; `allocate` takes
free blocks first and then evicts cached ones, least recently released first, so `available` counts both.
With the cache off nothing is ever keyed and this is a plain refcounted free list.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs: list[int] = [0] * num_blocks  # holders of each block
        self._key: list[bytes | None] = [None] * num_blocks
        self._tag: list[str | None] = [None] * num_blocks
        self._index: dict[bytes, int] = {}  # key -> the block holding it
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks, least recently released first
        self.evictions = 0  # cached blocks reused for other content

    # ---- counts --------------------------------------------------------------------------------
    @property
    def available(self) -> int:
        """Blocks `allocate` can hand out: free plus cached-but-unreferenced."""
        return len(self._free) + len(self._lru)

    @property
    def held(self) -> int:
        return self.num_blocks - self.available

    @property
    def cached(self) -> int:
        """Blocks with a key (held or not)."""
        return len(self._index)

    def refs(self, block: int) -> int:
        return self._refs[block]

    # ---- allocation ----------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """`n` blocks with one holder each: free ones first, then the least recently released cached ones."""
        if n > self.available:
            raise RuntimeError(f"KV cache exhausted: need {n} blocks, {self.available} available")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._lru.popitem(last=False)
                self._unkey(b)
                self.evictions += 1
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        """Let go of `blocks` (the list is emptied). A block whose last holder leaves becomes cached when keyed,
        free otherwise; released in reverse, so a sequence's later blocks are evicted before its earlier ones."""
        for b in reversed(blocks):
            if self._refs[b] <= 0:
                raise RuntimeError(f"block {b} released more often than taken")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if self._key[b] is not None:
                    self._lru[b] = None
                else:
                    self._free.append(b)
        blocks.clear()

    def share(self, blocks: list[int]) -> list[int]:
        """Another holder of `blocks` (full blocks, never written again); a cached one leaves the LRU."""
        for b in blocks:
            if self._refs[b] == 0:
                if self._key[b] is None:
                    raise RuntimeError(f"block {b} is free: it cannot be shared")
                del self._lru[b]
            self._refs[b] += 1
        return list(blocks)

    # ---- the prefix index ----------------------------------------------------------------------
    def lookup(self, keys: list[bytes]) -> list[int]:
        """The blocks of the longest run of `keys` (from the first) that are cached or held under those keys."""
        out = []
        for key in keys:
            b = self._index.get(key)
            if b is None:
                break
            out.append(b)
        return out

    def register(self, block: int, key: bytes, tag: str) -> bool:
        """Give held `block` (full and computed) its content key; False when the key already names another block
        (the same content computed twice at once: this copy stays unkeyed and is freed with its holders)."""
        if self._refs[block] <= 0:
            raise RuntimeError(f"block {block} is not held: only a holder registers it")
        if key in self._index or self._key[block] is not None:
            return self._index.get(key) == block
        self._index[key] = block
        self._key[block], self._tag[block] = key, tag
        return True

    def drop_tag(self, tag: str) -> int:
        """Forget every key of `tag` (a deleted adapter version): its unreferenced blocks become free, held ones
        are freed by their holders as usual. Returns how many blocks lost their key."""
        dropped = 0
        for b in range(self.num_blocks):
            if self._tag[b] == tag:
                self._unkey(b)
                dropped += 1
                if self._refs[b] == 0:
                    del self._lru[b]
                    self._free.append(b)
        return dropped

    def _unkey(self, b: int) -> None:
        key = self._key[b]
        if key is not None and self._index.get(key) == b:
            del self._index[key]
        self._key[b] = self._tag[b] = None

    # ---- invariants (tests) --------------------------------------------------------------------
    def problems(self, holders: list[list[int]] | None = None) -> list[str]:
        """What breaks the invariants, [] when none; `holders` (every live block table) also checks refcounts."""
        out = []
        free, lru = set(self._free), set(self._lru)
        if len(free) != len(self._free):
            out.append("a block is on the free list twice")
        if free & lru:
            out.append(f"blocks both free and cached: {sorted(free & lru)}")
        for b in range(self.num_blocks):
            refs, key = self._refs[b], self._key[b]
            if refs < 0:
                out.append(f"block {b} has {refs} refs")
            if refs > 0 and (b in free or b in lru):
                out.append(f"block {b} is held ({refs}) and {'free' if b in free else 'cached'}")
            if refs == 0 and b not in free and b not in lru:
                out.append(f"block {b} has no holder and is neither free nor cached")
            if b in free and key is not None:
                out.append(f"free block {b} has a key")
            if b in lru and key is None:
                out.append(f"cached block {b} has no key")
            if key is not None and self._index.get(key) != b:
                out.append(f"block {b}'s key maps to block {self._index.get(key)}")
        if len(set(self._index.values())) != len(self._index):
            out.append("two keys map to one block")
        if holders is not None:
            counts = [0] * self.num_blocks
            for table in holders:
                for b in table:
                    counts[b] += 1
            wrong = [(b, self._refs[b], c) for b, c in enumerate(counts) if c != self._refs[b]]
            if wrong:
                out.append(f"refcounts differ from holders (block, refs, holders): {wrong[:8]}")
        return out
