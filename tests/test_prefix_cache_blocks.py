"""The block allocator and the prefix cache's keys, on small exact tables (no model)."""

from __future__ import annotations

import pytest

from server.engine.block_allocator import BlockAllocator
from server.engine.prefix_cache import BASE_IDENTITY, block_key, chain_root, namespace


def k(name: str) -> bytes:
    return name.encode()


def test_allocation_takes_free_blocks_first_then_the_least_recently_released_cached_ones() -> None:
    a = BlockAllocator(4)
    first = a.allocate(2)
    assert first == [0, 1]
    assert a.register(0, k("A"), "base") and a.register(1, k("B"), "base")
    a.free(list(first))  # released in reverse: 1 is cached before 0, so 1 is the older
    assert (a.available, a.held, a.cached) == (4, 0, 2)
    assert a.allocate(2) == [2, 3]  # free ones before any cached one
    assert a.evictions == 0
    assert a.allocate(1) == [1]  # the least recently released cached block (a sequence's later block)
    assert a.evictions == 1 and a.lookup([k("A"), k("B")]) == [0]  # B's key went with its block
    assert a.allocate(1) == [0]
    assert a.lookup([k("A")]) == [] and a.cached == 0
    with pytest.raises(RuntimeError, match="exhausted"):
        a.allocate(1)
    assert a.problems([[2], [3], [1], [0]]) == []


def test_a_hit_leaves_the_lru_and_returns_as_the_most_recent() -> None:
    a = BlockAllocator(3)
    blocks = a.allocate(3)
    for b, name in zip(blocks, "XYZ", strict=True):
        a.register(b, k(name), "base")
    a.free(list(blocks))  # LRU order: 2, 1, 0
    hit = a.share(a.lookup([k("X"), k("Y")]))  # blocks 0 and 1 taken again
    assert hit == [0, 1] and a.available == 1 and a.refs(0) == 1
    a.free(list(hit))  # LRU order now: 2, 1, 0
    assert a.allocate(1) == [2]
    assert a.allocate(1) == [1]
    assert a.problems([[2], [1]]) == []


def test_lookup_stops_at_the_first_missing_key_and_a_key_names_one_block() -> None:
    a = BlockAllocator(4)
    b0, b1, b2 = a.allocate(3)
    assert a.register(b0, k("A"), "t")
    assert a.register(b1, k("B"), "t")
    assert not a.register(b2, k("A"), "t")  # the same content computed twice: the copy stays unkeyed
    assert a.register(b0, k("A"), "t")  # registering a block under its own key again is a no-op
    assert a.lookup([k("A"), k("C"), k("B")]) == [b0]
    assert a.lookup([k("A"), k("B")]) == [b0, b1]
    a.free([b2])
    assert a.available == 2 and a.cached == 2  # the unkeyed copy went back to the free list
    assert a.problems([[b0], [b1]]) == []


def test_drop_tag_frees_unreferenced_blocks_and_unkeys_held_ones() -> None:
    a = BlockAllocator(4)
    blocks = a.allocate(4)
    for b, tag in zip(blocks, ["v1", "v1", "v2", "base"], strict=True):
        a.register(b, k(f"key{b}"), tag)
    a.free(blocks[:1])  # block 0 cached, block 1 still held
    assert a.drop_tag("v1") == 2
    assert a.lookup([k("key0")]) == [] and a.lookup([k("key1")]) == []
    assert a.available == 1 and a.cached == 2
    a.free([1])  # its holder lets go: no key, so it is free, not cached
    assert a.available == 2 and a.problems([[2], [3]]) == []


def test_invariant_check_sees_broken_tables() -> None:
    a = BlockAllocator(3)
    a.allocate(1)
    assert a.problems([[0, 0]]) != []  # two holders, one ref
    a._free.append(0)  # held and free at once
    assert any("held" in p for p in a.problems())
    with pytest.raises(RuntimeError):
        BlockAllocator(2).free([0])
    with pytest.raises(RuntimeError):
        BlockAllocator(2).share([1])  # a free block cannot be shared


def test_keys_chain_over_parent_tokens_namespace_and_identity() -> None:
    root = chain_root(namespace("acme"), BASE_IDENTITY)
    k1 = block_key(None, root, [1, 2, 3, 4])
    assert len(k1) == 32 and k1 == block_key(None, root, [1, 2, 3, 4])
    assert block_key(None, root, [1, 2, 3, 5]) != k1
    assert block_key(k1, root, [5, 6, 7, 8]) != block_key(None, root, [5, 6, 7, 8])  # the parent is in the key
    others = [chain_root(namespace("globex"), BASE_IDENTITY), chain_root(namespace("acme", "s"), BASE_IDENTITY),
              chain_root(namespace("acme"), "LORA:sha256:00"), chain_root(namespace("acme"), "IA3:sha256:00")]
    keys = {block_key(None, r, [1, 2, 3, 4]) for r in others}
    assert len(keys) == 4 and k1 not in keys
    assert block_key(None, root, [256]) != block_key(None, root, [1, 0])
    assert block_key(None, root, [-1, 7]) != block_key(None, root, [0, 7])  # an adapter-supplied entry is not 0
