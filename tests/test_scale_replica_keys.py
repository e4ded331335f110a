"""server/scale/replica_keys.py: which keys a replica keeps registered. Needs no Ray: the interleavings are
driven by hand and by a simulation of Ray's multiplexed LRU (one load at a time under a lock, LRU eviction
before a load, the eviction's news reaching the loop after an arbitrary delay)."""

from __future__ import annotations

import random

from server.scale.replica_keys import ReplicaKeys


def test_eviction_while_in_use_then_reload_while_the_last_user_ends_keeps_the_key():
    keys = ReplicaKeys()
    g1 = keys.load_started("k")
    assert not keys.load_ended("k", ok=True)
    keys.acquire("k")
    assert not keys.evicted("k", g1)  # in use
    keys.load_started("k")  # a new request reloads it
    assert not keys.release("k")  # the last user ends during the reload: the load keeps it (the bug: unregistered)
    assert not keys.load_ended("k", ok=True)
    assert "k" in keys.resident


def test_late_news_of_an_older_generation_is_ignored():
    keys = ReplicaKeys()
    g1 = keys.load_started("k")
    keys.load_ended("k", ok=True)
    g2 = keys.load_started("k")  # Ray popped g1; its news is still on the way
    keys.load_ended("k", ok=True)
    assert not keys.evicted("k", g1)
    assert "k" in keys.resident
    assert keys.evicted("k", g2)  # the current generation's eviction, nothing else holds it


def test_failed_load_and_deletion_unregister_when_unused():
    keys = ReplicaKeys()
    keys.load_started("k")
    assert keys.load_ended("k", ok=False)
    keys.load_started("k")
    keys.load_ended("k", ok=True)
    keys.acquire("k")
    assert not keys.forget("k")  # deleted while a request runs: kept for it
    assert keys.release("k")
    assert keys.loads["k"] == 1


def test_simulated_ray_lru_never_unregisters_a_key_about_to_be_used():
    seed = random.randrange(2**31)  # the conftest fixture seeded `random`; printed on failure
    rng = random.Random(seed)
    for trial in range(200):
        _simulate(rng, slots=rng.choice((1, 2, 3)), n_keys=rng.choice((2, 4, 8)), steps=300, label=(seed, trial))


def _simulate(rng: random.Random, slots: int, n_keys: int, steps: int, label) -> None:
    keys, lru, registered = ReplicaKeys(), [], set()  # lru: [(key, generation)], oldest first
    news: list[tuple[str, int]] = []  # evictions Ray made whose news has not reached the loop
    loading: tuple[str, int] | None = None  # Ray's lock: one load at a time
    running: list[str] = []

    def unregister_if(unused: bool, key: str) -> None:
        if unused:
            registered.discard(key)

    for _ in range(steps):
        op = rng.randrange(4)
        if op == 0:  # a request arrives: hit, or a load starts when the lock is free
            key = f"k{rng.randrange(n_keys)}"
            if any(k == key for k, _ in lru):
                assert key in registered, label
                keys.acquire(key)
                running.append(key)
            elif loading is None:
                if len(lru) >= slots:
                    news.append(lru.pop(0))
                loading = (key, keys.load_started(key))
                registered.add(key)  # the loader thread registers (or revives) it
        elif op == 1 and loading is not None:  # the load finishes; its request acquires with no await between
            key, gen = loading
            ok = rng.random() > 0.1
            unregister_if(keys.load_ended(key, ok), key)
            if ok:
                lru.append((key, gen))
                assert key in registered, label
                keys.acquire(key)
                running.append(key)
            loading = None
        elif op == 2 and news:  # the news of an eviction reaches the loop
            key, gen = news.pop(rng.randrange(len(news)))
            unregister_if(keys.evicted(key, gen), key)
        elif op == 3 and running:  # a request ends
            key = running.pop(rng.randrange(len(running)))
            unregister_if(keys.release(key), key)
        for key in running:
            assert key in registered, label
    if loading is not None:
        unregister_if(keys.load_ended(loading[0], True), loading[0])
        lru.append(loading)
    for key in running:
        unregister_if(keys.release(key), key)
    for key, gen in news:
        unregister_if(keys.evicted(key, gen), key)
    assert registered == {k for k, _ in lru}, label  # nothing leaks, nothing Ray holds is missing
