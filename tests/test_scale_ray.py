"""Scale-out on Ray Serve (server.scale): 2 replicas of the tiny model behind the gRPC ingress, one local Ray
cluster for the module. Oracles: the single-process server (tests.server_utils.running_server) on the same
model and adapter files, and Ray's default routing (no multiplexed id) for the affinity comparison."""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

try:
    import ray
    from ray import serve
except ImportError as exc:  # the `ray` dependency group is not installed
    pytest.skip(f"ray[serve] is not importable ({exc}); install the `ray` dependency group", allow_module_level=True)

import numpy as np  # noqa: E402

from tests.adapter_files import peft_adapter  # noqa: E402
from tests.scale_utils import (  # noqa: E402
    APP,
    engine_handle,
    free_port,
    replica_actor_names,
    replica_stats,
    wait_replicas_running,
    zipf_choices,
)
from tests.server_utils import running_server  # noqa: E402

REPLICAS = 2
SLOTS = 2  # adapters per replica: 8 zipf adapters do not fit one replica
N_ADAPTERS = 8
PROMPTS = ["Name three colors.", "The capital of France is", "Once upon a time", "1 2 3 4"]


@pytest.fixture(scope="module")
def files(tiny_llama_dir):
    return [peft_adapter(tiny_llama_dir, rank=4, seed=s) for s in range(N_ADAPTERS)]


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir, tmp_path_factory, files):
    from clients import SwitchboardClient
    from server.scale.app import build
    from server.scale.settings import ScaleSettings

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray.init(num_cpus=REPLICAS + 1, object_store_memory=80 << 20, include_dashboard=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                                       "PYTHONPATH": root}},
             log_to_driver=False)
    port, http_port = free_port(), free_port()
    settings = ScaleSettings(model=str(tiny_llama_dir), quantize=False, replicas=REPLICAS, adapters_per_replica=SLOTS,
                             data_dir=str(tmp_path_factory.mktemp("scale-data")), port=port, metrics_port=None,
                             max_running=64, max_waiting=256, kv_blocks=512, http_port=http_port)
    try:
        serve.start(proxy_location="Disabled")
        serve.run(build(settings), name=APP, route_prefix=None)
        client = SwitchboardClient(f"127.0.0.1:{port}", timeout=120)
        client.http_url = f"http://127.0.0.1:{http_port}"
        for i, path in enumerate(files):  # through the ingress: a0..a7 (affinity), b0..b7 (default routing)
            client.upload_adapter(path, f"a{i}")
            client.upload_adapter(path, f"b{i}")
        yield client
        client.close()
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, files):
    """The single-process server with the same adapters: name -> result of each test request."""
    with running_server(tiny_llama_dir) as srv, srv.client(None) as c:
        for i, path in enumerate(files):
            c.upload_adapter(path, f"a{i}")
        yield c


def _requests(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    picks = zipf_choices(N_ADAPTERS, n, 1.1, rng)
    return [{"prompt": PROMPTS[k % len(PROMPTS)], "adapter": f"a{a}", "max_new_tokens": 6} for k, a in enumerate(picks)]


def test_outputs_equal_the_single_process_server(cluster, reference):
    cases = [{"prompt": p, "adapter": a, "max_new_tokens": 8} for p in PROMPTS[:2] for a in ("", "a0", "a3", "a7")]
    cases.append({"prompt": PROMPTS[2], "adapter": "a1", "max_new_tokens": 8, "temperature": 0.9, "seed": 7})
    for case in cases:
        ours, theirs = cluster.generate(**case), reference.generate(**case)
        assert ours.token_ids == theirs.token_ids, case
        assert ours.text == theirs.text
        streamed = [t for ch in cluster.stream(**case) for t in ch.token_ids]
        assert streamed == theirs.token_ids, case


def test_affinity_loads_fewer_adapters_than_default_routing(cluster, tiny_llama_dir):
    from server.engine.request import GenerationRequest, SamplingParams
    from server.scale.remote_engine import RemoteEngine
    from server.scale.settings import ScaleSettings

    seed = random.randrange(2**31)
    picks = zipf_choices(N_ADAPTERS, 400, 1.1, np.random.default_rng(seed))
    results = {}
    for prefix, affinity in (("b", False), ("a", True)):
        remote = RemoteEngine(engine_handle(), ScaleSettings(model=str(tiny_llama_dir), quantize=False,
                                                             affinity=affinity))
        before = _loads(prefix)
        for n, a in enumerate(picks):
            req = GenerationRequest(f"{prefix}-{seed}-{n}", (1, 2, 3), SamplingParams(max_new_tokens=2),
                                    adapter=f"local/{prefix}{a}@1", tenant="local")
            handle = remote.submit(req)
            while not handle.get(timeout=60).finished:
                pass
        results[prefix] = _loads(prefix) - before
    share = {k: 1 - v / len(picks) for k, v in results.items()}  # every miss is one load (one request at a time)
    print(f"seed={seed} adapter loads in {len(picks)} requests: default routing {results['b']} "
          f"(adapter resident for {share['b']:.0%}), affinity {results['a']} ({share['a']:.0%})")
    assert results["a"] < results["b"], f"seed={seed}: {results}"


def _loads(prefix: str) -> int:
    stats = replica_stats(REPLICAS)
    return sum(n for s in stats.values() for key, n in s["loads"].items() if key.startswith(f"local/{prefix}"))


def test_upload_served_by_both_replicas_and_delete_stops_both(cluster, reference, files):
    from clients.errors import NotFound
    from server.engine.request import GenerationRequest, SamplingParams

    cluster.upload_adapter(files[5], "fresh")
    info = cluster.get_adapter("fresh")
    key = f"local/fresh@{info.version}"
    expected = reference.generate(PROMPTS[0], adapter="a5", max_new_tokens=6).token_ids
    assert cluster.generate(PROMPTS[0], adapter="fresh", max_new_tokens=6).token_ids == expected
    ids = tuple(cluster_tokenize(PROMPTS[0]))
    handle, served = engine_handle(), set()
    for n in range(60):  # no multiplexed id: Ray spreads these over both replicas
        req = GenerationRequest(f"fresh-{n}", ids, SamplingParams(max_new_tokens=6), adapter=key, tenant="local")
        tokens = [t for ev in handle.options(stream=True).generate.remote(req) for t in ev.token_ids]
        assert tokens == expected
        served = {r for r, s in replica_stats(REPLICAS).items() if key in s["loads"]}
        if len(served) == REPLICAS:
            break
    assert len(served) == REPLICAS
    cluster.delete_adapter("fresh")
    with pytest.raises(NotFound):
        cluster.generate(PROMPTS[0], adapter="fresh", max_new_tokens=6)
    for n in range(8):  # a replica that still holds the key refuses it too
        req = GenerationRequest(f"gone-{n}", ids, SamplingParams(max_new_tokens=6), adapter=key, tenant="local")
        with pytest.raises(Exception, match="deleted"):
            list(handle.options(stream=True).generate.remote(req))


def cluster_tokenize(prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    from server.model.checkpoint import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir(None))(prompt)["input_ids"]


def test_replica_killed_with_64_in_flight(cluster, reference):
    reqs = [{"prompt": PROMPTS[k % 4], "adapter": f"a{k % N_ADAPTERS}", "max_new_tokens": 24, "ignore_eos": True}
            for k in range(64)]
    expected = [reference.generate(**r).token_ids for r in reqs]
    victim = replica_actor_names()[0]

    def call(k: int):
        if k % 2:
            return [t for ch in cluster.stream(**reqs[k]) for t in ch.token_ids]
        return cluster.generate(**reqs[k]).token_ids

    with ThreadPoolExecutor(64) as pool:
        futures = [pool.submit(call, k) for k in range(64)]
        time.sleep(0.5)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        got = [f.result(timeout=300) for f in futures]
    failures = serve.get_deployment_handle("Ingress", app_name=APP).failures.remote().result(timeout_s=30)
    print(f"after the kill: {failures}")
    assert failures["resubmitted"] + failures["cut"] > 0, "the kill hit no request in flight"
    wrong = [k for k in range(64) if got[k] != expected[k]]
    assert not wrong, f"requests {wrong} returned tokens that differ from the single-process server's"
    wait_replicas_running(REPLICAS)
    assert victim not in replica_actor_names()
    assert cluster.generate(PROMPTS[0], adapter="a2", max_new_tokens=6).token_ids == reference.generate(
        PROMPTS[0], adapter="a2", max_new_tokens=6).token_ids


def _post(url: str, body: dict) -> tuple[int, bytes]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_openai_http_api_through_the_ingress_equals_grpc(cluster):
    import json

    grpc_text = cluster.generate(PROMPTS[1], adapter="a3", max_new_tokens=6).text
    body = {"model": "a3", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0}
    status, raw = _post(f"{cluster.http_url}/v1/completions", body)
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["text"] == grpc_text
    status, raw = _post(f"{cluster.http_url}/v1/completions", {**body, "stream": True})
    events = [json.loads(line[6:]) for line in raw.decode().splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert status == 200 and "".join(e["choices"][0]["text"] for e in events if e["choices"]) == grpc_text
    status, raw = _post(f"{cluster.http_url}/v1/completions", {**body, "model": "no-such-adapter"})
    assert status == 404 and b"no-such-adapter" in raw
    status, raw = _post(f"{cluster.http_url}/v1/completions", {**body, "prompt": "x " * 600})  # > context limit
    assert status == 400, raw


def test_output_constraints_through_the_ingress(cluster, reference):
    """A constraint travels to the replica as a plain value and is compiled there; a bad one is refused at
    the ingress (INVALID_ARGUMENT)."""
    import grpc

    from clients.errors import SwitchboardError

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    for case in ({"prompt": PROMPTS[0], "adapter": "a2", "max_new_tokens": 24, "json_schema": schema},
                 {"prompt": PROMPTS[1], "adapter": "", "max_new_tokens": 24, "choice": ["yes", "no"]}):
        ours, theirs = cluster.generate(**case), reference.generate(**case)
        assert ours.token_ids == theirs.token_ids and ours.finish_reason == "stop", case
    with pytest.raises(SwitchboardError) as info:
        cluster.generate(PROMPTS[0], regex="(x", max_new_tokens=4)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_prefix_routing_sends_a_conversation_back_to_the_replica_that_cached_it(cluster):
    """The ingress's router (server.scale.prefix_router) sends each follow-up of a 64-token prompt to the replica
    that cached it: every one is served 64 tokens from the prefix cache. Routing that ignored prefixes would
    send each to either replica (about 2 ** -8 that all eight land right; with prefix_routing=False it failed so)."""
    base = list(range(300, 364))  # four full 16-token blocks
    assert cluster.generate(token_ids=base, max_new_tokens=2).cached_prompt_tokens == 0
    cached = [cluster.generate(token_ids=base + [400 + k] * 3, max_new_tokens=2).cached_prompt_tokens
              for k in range(8)]
    assert cached == [64] * 8
    from server.scale.prefix_summary import parse_export, routing_keys

    keys = routing_keys("local", None, None, base, 16, 64)  # what the serving replica exports to the routers
    exports = [parse_export(engine_handle().record_routing_stats.remote().result(timeout_s=30)["prefix_keys"])
               for _ in range(20)]  # Ray spreads these calls over both replicas
    assert any(set(keys) <= e for e in exports) and not all(set(keys) <= e for e in exports)
