"""Helpers of the Ray Serve tests: one local Ray cluster with the Switchboard app, replica stats, zipf."""

from __future__ import annotations

import socket
import time

import numpy as np

APP = "switchboard"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_handle():
    from ray import serve

    return serve.get_deployment_handle("EngineReplica", app_name=APP)


def replica_stats(n: int, tries: int = 200) -> dict[str, dict]:
    """Each replica's stats (Ray routes each call to some replica: call until all n answered)."""
    handle, seen = engine_handle(), {}
    for _ in range(tries):
        s = handle.stats.remote().result(timeout_s=30)
        seen[s["replica"]] = s
        if len(seen) >= n:
            return seen
    raise AssertionError(f"only {len(seen)} of {n} replicas answered")


def replica_actor_names() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if "EngineReplica" in a["name"] and a["namespace"] == "serve")


def wait_replicas_running(n: int, timeout: float = 120.0) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dep = serve.status().applications[APP].deployments["EngineReplica"]
        if dep.replica_states.get("RUNNING", 0) == n and dep.status == "HEALTHY":
            return
        time.sleep(0.5)
    raise AssertionError(f"EngineReplica did not get back to {n} running replicas: {serve.status()}")


def zipf_choices(n_items: int, n: int, s: float, rng: np.random.Generator) -> list[int]:
    p = 1.0 / np.arange(1, n_items + 1) ** s
    return [int(i) for i in rng.choice(n_items, size=n, p=p / p.sum())]
