"""The gRPC service end to end: a real server on a loopback port, called only through the client library.

Oracle: the same requests submitted straight to the server's engine (greedy and seeded sampling), with
the prompt tokenized by the model's tokenizer (chat template for `messages`).
"""

from __future__ import annotations

import asyncio
import random
import threading

import grpc
import pytest

from clients import AsyncSwitchboardClient, InvalidArgument, NotFound, PermissionDenied, SwitchboardClient
from server.engine.request import GenerationRequest, SamplingParams
from tests.engine_utils import collect
from tests.server_utils import running_server

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with running_server(tiny_llama_dir, tenants=["acme", "beta"]) as s:
        yield s


@pytest.fixture(scope="module")
def acme(server):
    with server.client("acme", timeout=60) as c:
        yield c


def engine_result(server, ids: list[int], adapter: str | None = None, **sampling):
    """The oracle: the engine's own output for these tokens (submitted directly, bypassing gRPC)."""
    rid = f"oracle-{random.getrandbits(64):x}"
    return collect(server.engine.submit(GenerationRequest(rid, tuple(ids), SamplingParams(**sampling), adapter)))


def chat_ids(server, messages) -> list[int]:
    ids = server.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def check_same(server, client, ids, inputs: dict, **sampling):
    want = engine_result(server, ids, **sampling)
    got = client.generate(**inputs, **sampling)
    chunks = list(client.stream(**inputs, **sampling))
    assert got.token_ids == want.token_ids and got.text == want.text
    assert got.finish_reason == str(want.finish_reason)
    assert [t for c in chunks for t in c.token_ids] == want.token_ids
    assert "".join(c.text for c in chunks) == want.text
    assert not any("\ufffd" in c.text for c in chunks) or "\ufffd" in want.text  # no split multi-byte chars
    last = chunks[-1]
    assert last.finished and not any(c.finished for c in chunks[:-1])
    assert last.finish_reason == got.finish_reason
    assert (last.prompt_tokens, last.completion_tokens) == (got.prompt_tokens, got.completion_tokens)
    assert got.prompt_tokens == len(ids) and got.completion_tokens == len(want.token_ids)
    assert got.total_ms >= got.ttft_ms >= got.queue_ms >= 0 and got.ttft_ms > 0
    assert chunks[0].ttft_ms > 0 and last.total_ms > 0
    return got


def test_unary_and_stream_equal_engine_on_token_ids(server, acme):
    rng = random.Random(1234)
    vocab = server.engine.args.vocab_size
    for n in (1, 7, 40):
        ids = [rng.randrange(vocab) for _ in range(n)]
        check_same(server, acme, ids, {"token_ids": ids}, max_new_tokens=12, ignore_eos=True)
    ids = [rng.randrange(vocab) for _ in range(9)]  # seeded sampling is reproducible through the service too
    check_same(server, acme, ids, {"token_ids": ids}, max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50,
               seed=rng.randrange(2**62), ignore_eos=True)


def test_prompt_and_messages_are_tokenized_like_the_model(server, acme):
    tok = server.engine.tokenizer
    prompt = "Über den Wolken 🌤️ — naïve café"
    check_same(server, acme, tok.encode(prompt), {"prompt": prompt}, max_new_tokens=9)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors."}]
    got = check_same(server, acme, chat_ids(server, messages), {"messages": messages}, max_new_tokens=9)
    assert got.adapter_name == "" and got.adapter_version == 0


def test_stop_strings_and_request_id(server, acme):
    ids = [5, 6, 7, 8]
    full = acme.generate(token_ids=ids, max_new_tokens=16, ignore_eos=True)
    stop = full.text[len(full.text) // 2:][:3]
    if not stop.strip():
        pytest.skip("the tiny model's output has no usable stop string")
    want = full.text[: full.text.index(stop)]
    got = acme.generate(token_ids=ids, max_new_tokens=16, ignore_eos=True, stop=[stop], request_id="my-id-1")
    streamed = "".join(c.text for c in acme.stream(token_ids=ids, max_new_tokens=16, ignore_eos=True, stop=[stop]))
    assert got.text == want == streamed and got.finish_reason == "stop"
    assert got.request_id == "my-id-1"


def test_64_concurrent_streams_all_complete(server):
    rng = random.Random(7)
    vocab = server.engine.args.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(3, 30))] for _ in range(64)]
    results: list = [None] * 64
    errors: list = []
    start = threading.Barrier(64)

    def worker(i: int, client: SwitchboardClient) -> None:
        try:
            start.wait()
            results[i] = list(client.stream(token_ids=prompts[i], max_new_tokens=16, ignore_eos=True))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with server.client("beta", timeout=120) as client:
        threads = [threading.Thread(target=worker, args=(i, client)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
    assert not errors, errors[:3]
    for i, chunks in enumerate(results):
        assert chunks and chunks[-1].finished and chunks[-1].completion_tokens == 16
        tokens = [t for c in chunks for t in c.token_ids]
        assert tokens == engine_result(server, prompts[i], max_new_tokens=16, ignore_eos=True).token_ids


def test_asyncio_client_streams_and_generates(server):
    async def run():
        async with AsyncSwitchboardClient(server.target, api_key=server.keys["acme"], timeout=60) as c:
            assert await c.health() == "SERVING"
            results = await asyncio.gather(*[c.generate(token_ids=[i + 3, 9], max_new_tokens=6, ignore_eos=True)
                                             for i in range(8)])
            chunks = [ch async for ch in c.stream(token_ids=[3, 9], max_new_tokens=6, ignore_eos=True)]
            with pytest.raises(NotFound, match="'ghost' not found"):  # errors are typed here too
                await c.generate(token_ids=[3], adapter="ghost")
            with pytest.raises(InvalidArgument, match="top_p"):
                _ = [ch async for ch in c.stream(token_ids=[3], top_p=2.0)]
            return results, chunks

    results, chunks = asyncio.run(run())
    assert [t for c in chunks for t in c.token_ids] == results[0].token_ids
    for i, r in enumerate(results):
        assert r.token_ids == engine_result(server, [i + 3, 9], max_new_tokens=6, ignore_eos=True).token_ids


def test_health_serving_and_reflection_lists_services(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with SwitchboardClient(server.target) as anonymous:  # health needs no key
        assert anonymous.health() == "SERVING"
        assert anonymous.health("switchboard.v1.Inference") == "SERVING"
    with grpc.insecure_channel(server.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"switchboard.v1.Inference", "switchboard.v1.Admin", "grpc.health.v1.Health"} <= services


def test_adapters_resolve_per_tenant_and_match_the_engine(server, acme, tiny_llama_dir, tmp_path):
    from tests.peft_adapters import AdapterSpec, make_peft_adapter

    private = make_peft_adapter(tiny_llama_dir, AdapterSpec("style", "lora", rank=4, seed=3), tmp_path / "style")
    shared = make_peft_adapter(tiny_llama_dir, AdapterSpec("tone", "prefix", n_virtual=4, seed=4), tmp_path / "tone")
    server.registry.create("acme", "style", private)
    server.registry.create("acme", "tone", shared, shared=True)
    ids = [11, 12, 13, 14, 15]
    for name in ("style", "tone"):
        key = server.registry.resolve("acme", name).pool_key
        want = engine_result(server, ids, adapter=key, max_new_tokens=8, ignore_eos=True)
        got = acme.generate(token_ids=ids, adapter=name, max_new_tokens=8, ignore_eos=True)
        assert got.token_ids == want.token_ids
        assert (got.adapter_name, got.adapter_version) == (f"acme/{name}", 1)
        last = list(acme.stream(token_ids=ids, adapter=name, max_new_tokens=8, ignore_eos=True))[-1]
        assert (last.adapter_name, last.adapter_version) == (f"acme/{name}", 1)
    base = acme.generate(token_ids=ids, max_new_tokens=8, ignore_eos=True)
    assert base.token_ids != got.token_ids  # the adapter changed the output
    with server.client("beta") as beta:
        assert beta.generate(token_ids=ids, adapter="tone", max_new_tokens=8, ignore_eos=True).token_ids \
            == got.token_ids  # shared: usable by another tenant
        with pytest.raises(NotFound, match="style"):
            beta.generate(token_ids=ids, adapter="style")
        with pytest.raises(PermissionDenied, match="not shared"):
            beta.generate(token_ids=ids, adapter="acme/style")
    with server.client("admin") as admin:  # the admin tenant may use anyone's adapter by full name
        result = admin.generate(token_ids=ids, adapter="acme/style", max_new_tokens=8, ignore_eos=True)
        assert result.adapter_version == 1


@pytest.mark.slow
def test_default_model_nf4_chat_through_the_service(default_model_dir):
    messages = [{"role": "user", "content": "Name three colors."}]
    with running_server(default_model_dir, quantize=True) as s, s.client(None, timeout=300) as c:
        check_same(s, c, chat_ids(s, messages), {"messages": messages}, max_new_tokens=4)
