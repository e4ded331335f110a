"""The OpenAI-compatible HTTP API through the official `openai` package, against a real server.

Oracles: the gRPC API of the same server (same engine), PEFT's PeftModel (adapters selected by `model`),
transformers' logits on the dense tiny model (logprobs), and single seeded requests (n choices).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.adapter_files import peft_adapter
from tests.http_utils import MODEL_ID, running_http_server

pytestmark = pytest.mark.timeout(300)

CHAT = [{"role": "user", "content": "Name three colors."}]
PROMPT_IDS = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with running_http_server(tiny_llama_dir, tenants=["acme", "beta"]) as s:
        reg = s.grpc.registry
        reg.create("acme", "lora1", peft_adapter(tiny_llama_dir, "lora", rank=4, seed=61))
        reg.create("acme", "prompt1", peft_adapter(tiny_llama_dir, "prompt", seed=62))
        reg.create("acme", "prefix1", peft_adapter(tiny_llama_dir, "prefix", seed=63))
        reg.create("beta", "shared1", peft_adapter(tiny_llama_dir, "lora", rank=2, seed=64), shared=True)
        reg.create("beta", "private1", peft_adapter(tiny_llama_dir, "lora", rank=2, seed=65))
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.openai("acme")


@pytest.fixture(scope="module")
def grpc_client(server):
    with server.grpc.client("acme", timeout=60) as c:
        yield c


def ids_of(logprobs_tokens: list[str]) -> list[int]:
    assert all(t.startswith("token_id:") for t in logprobs_tokens)
    return [int(t.split(":", 1)[1]) for t in logprobs_tokens]


def test_chat_unary_and_stream_equal_grpc(client, grpc_client):
    want = grpc_client.generate(messages=CHAT, max_new_tokens=12, ignore_eos=True)
    got = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert got.object == "chat.completion" and len(got.choices) == 1
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    assert got.usage.total_tokens == want.prompt_tokens + want.completion_tokens
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert not any("\ufffd" in d for d in deltas) or "\ufffd" in want.text  # never a split character
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.completion_tokens
    assert all(c.usage is None for c in chunks[:-1]) and all(c.id == chunks[0].id for c in chunks)


def test_completions_unary_and_stream_equal_grpc(client, grpc_client):
    prompt = "The capital of France is"
    want = grpc_client.generate(prompt, max_new_tokens=10, ignore_eos=True)
    got = client.completions.create(model="base", prompt=prompt, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.object == "text_completion" and got.choices[0].text == want.text
    assert got.usage.prompt_tokens == want.prompt_tokens
    parts = list(client.completions.create(model="base", prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}))
    assert "".join(p.choices[0].text for p in parts) == want.text
    assert parts[-1].choices[0].finish_reason == "length"
    echoed = client.completions.create(model="base", prompt=prompt, max_tokens=10, temperature=0, echo=True,
                                       extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == prompt + want.text
    streamed = client.completions.create(model="base", prompt=prompt, max_tokens=10, temperature=0, echo=True,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(p.choices[0].text for p in streamed) == prompt + want.text
    # token-id prompts and lists of prompts: one choice per prompt, in order
    many = client.completions.create(model="base", prompt=[PROMPT_IDS, [11, 12, 13]], max_tokens=4, temperature=0,
                                     extra_body={"ignore_eos": True})
    singles = [grpc_client.generate(token_ids=p, max_new_tokens=4, ignore_eos=True).text
               for p in (PROMPT_IDS, [11, 12, 13])]
    assert [c.text for c in many.choices] == singles and [c.index for c in many.choices] == [0, 1]


def test_stop_strings_and_max_completion_tokens(client, grpc_client):
    full = grpc_client.generate(token_ids=PROMPT_IDS, max_new_tokens=16, ignore_eos=True).text
    stop = full[len(full) // 2: len(full) // 2 + 3].strip() or full[-2:]
    want = grpc_client.generate(token_ids=PROMPT_IDS, max_new_tokens=16, ignore_eos=True, stop=[stop])
    got = client.completions.create(model="base", prompt=PROMPT_IDS, max_tokens=16, temperature=0, stop=stop,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason
    chat = client.chat.completions.create(model="base", messages=CHAT, max_completion_tokens=3, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 3 and chat.choices[0].finish_reason == "length"


def test_async_client_unary_and_streaming_concurrently(server, grpc_client):
    want_chat = grpc_client.generate(messages=CHAT, max_new_tokens=8, ignore_eos=True).text
    want_text = grpc_client.generate("Once upon a time", max_new_tokens=8, ignore_eos=True).text

    async def main():
        c = server.openai("acme", async_=True)
        extra = {"extra_body": {"ignore_eos": True}, "temperature": 0, "max_tokens": 8}

        async def stream_chat():
            s = await c.chat.completions.create(model=MODEL_ID, messages=CHAT, stream=True, **extra)
            return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])

        async def stream_text():
            s = await c.completions.create(model=MODEL_ID, prompt="Once upon a time", stream=True, **extra)
            return "".join([ch.choices[0].text async for ch in s])

        unary_chat = c.chat.completions.create(model=MODEL_ID, messages=CHAT, **extra)
        unary_text = c.completions.create(model=MODEL_ID, prompt="Once upon a time", **extra)
        a, b, sc, st = await asyncio.gather(unary_chat, unary_text, stream_chat(), stream_text())
        models = await c.models.list()
        await c.close()
        return a.choices[0].message.content, b.choices[0].text, sc, st, [m.id for m in models.data]

    chat, text, streamed_chat, streamed_text, model_ids = asyncio.run(main())
    assert chat == streamed_chat == want_chat and text == streamed_text == want_text
    assert MODEL_ID in model_ids


def test_models_list_shows_base_and_visible_adapters(server, client):
    models = client.models.list().data
    ids = [m.id for m in models]
    assert ids[0] == MODEL_ID
    for name in ("lora1", "prompt1", "prefix1"):
        assert name in ids and f"acme/{name}" in ids
    assert "shared1" in ids and "beta/shared1" in ids
    assert "private1" not in ids and "beta/private1" not in ids
    by_id = {m.id: m for m in models}
    assert by_id["beta/shared1"].owned_by == "beta" and by_id["lora1"].owned_by == "acme"
    assert by_id["prompt1"].model_extra["kind"] == "PROMPT_TUNING" and by_id["lora1"].model_extra["version"] == 1
    beta_ids = [m.id for m in server.openai("beta").models.list().data]
    assert "private1" in beta_ids and "lora1" not in beta_ids and "acme/lora1" not in beta_ids


@pytest.mark.parametrize("name", ["lora1", "prompt1", "prefix1"])
def test_adapter_by_model_equals_grpc_and_peft(server, client, grpc_client, tiny_llama_dir, name):
    from tests.peft_adapters import peft_logits

    kind = {"lora1": ("lora", 61), "prompt1": ("prompt", 62), "prefix1": ("prefix", 63)}[name]
    want = grpc_client.generate(token_ids=PROMPT_IDS, adapter=name, max_new_tokens=6, ignore_eos=True)
    got = client.completions.create(model=name, prompt=PROMPT_IDS, max_tokens=6, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    ids = ids_of(got.choices[0].logprobs.tokens)
    assert ids == want.token_ids and got.choices[0].text == want.text
    # the extra `adapter` field, for clients that pin `model`
    pinned = client.completions.create(model=MODEL_ID, prompt=PROMPT_IDS, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True, "adapter": f"acme/{name}"})
    assert pinned.choices[0].text == want.text
    base = client.completions.create(model=MODEL_ID, prompt=PROMPT_IDS, max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert base.choices[0].text != want.text  # the adapter changed the output
    ref = peft_logits(tiny_llama_dir, peft_adapter(tiny_llama_dir, kind[0], **({"rank": 4} if kind[0] == "lora"
                                                                               else {}), seed=kind[1]),
                      PROMPT_IDS + ids)
    assert ids == ref[len(PROMPT_IDS) - 1: -1].argmax(-1).tolist()


def test_n_choices_with_a_seed_equal_single_requests_with_derived_seeds(client):
    kw = {"model": MODEL_ID, "max_tokens": 8, "temperature": 1.0, "top_p": 0.95, "extra_body": {"ignore_eos": True}}
    seed = 1234
    many = client.completions.create(prompt="Tell me a story", n=3, seed=seed, **kw)
    singles = [client.completions.create(prompt="Tell me a story", seed=seed + i, **kw).choices[0].text
               for i in range(3)]
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == singles, f"seed={seed}"
    assert len(set(singles)) > 1  # the seeds really differ
    chat = client.chat.completions.create(messages=CHAT, n=3, seed=seed, **kw)
    chat_singles = [client.chat.completions.create(messages=CHAT, seed=seed + i, **kw).choices[0].message.content
                    for i in range(3)]
    assert [c.message.content for c in chat.choices] == chat_singles
    streamed = ["", "", ""]
    for chunk in client.chat.completions.create(messages=CHAT, n=3, seed=seed, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == chat_singles


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_equal_log_softmax_of_transformers_logits(client, tiny_llama_dir, temperature):
    """Logprobs are of the model's raw distribution (vLLM's default), whatever the temperature."""
    from tests.test_model_parity import hf_model

    got = client.completions.create(model=MODEL_ID, prompt=PROMPT_IDS, max_tokens=6, temperature=temperature,
                                    seed=7, logprobs=5,
                                    extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    lp = got.choices[0].logprobs
    out = ids_of(lp.tokens)
    with torch.no_grad():
        logits = hf_model(tiny_llama_dir, False)(torch.tensor([PROMPT_IDS + out])).logits[0].float()
    ref = torch.log_softmax(logits[len(PROMPT_IDS) - 1: -1], dim=-1)
    for k, token in enumerate(out):
        assert lp.token_logprobs[k] == pytest.approx(float(ref[k, token]), abs=1e-4)
        top = sorted(lp.top_logprobs[k].items(), key=lambda kv: -kv[1])
        vals, idx = ref[k].topk(5)
        assert ids_of([t for t, _ in top]) == idx.tolist()
        assert [v for _, v in top] == pytest.approx(vals.tolist(), abs=1e-4)
    chat = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=3, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy = most likely
    assert "".join(c.token for c in content) == chat.choices[0].message.content


def test_logit_bias_and_penalties_reach_the_sampler(server, client):
    from server.engine.request import GenerationRequest, SamplingParams
    from tests.engine_utils import collect

    forced = client.completions.create(model=MODEL_ID, prompt=PROMPT_IDS, max_tokens=5, temperature=0, logprobs=0,
                                       logit_bias={"1234": 100},
                                       extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    assert ids_of(forced.choices[0].logprobs.tokens) == [1234] * 5
    params = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "repetition_penalty": 1.3}
    got = client.completions.create(model=MODEL_ID, prompt=PROMPT_IDS, max_tokens=8, temperature=0, logprobs=0,
                                    frequency_penalty=1.5, presence_penalty=0.5,
                                    extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True,
                                                "repetition_penalty": 1.3})
    want = collect(server.grpc.engine.submit(GenerationRequest(
        "oracle-penalties", tuple(PROMPT_IDS), SamplingParams(max_new_tokens=8, ignore_eos=True, **params))))
    plain = collect(server.grpc.engine.submit(GenerationRequest(
        "oracle-plain", tuple(PROMPT_IDS), SamplingParams(max_new_tokens=8, ignore_eos=True))))
    assert ids_of(got.choices[0].logprobs.tokens) == want.token_ids
    assert len(set(want.token_ids)) > len(set(plain.token_ids)) or want.token_ids != plain.token_ids
    eos = server.grpc.engine.args.eos_token_ids[0]
    held = client.completions.create(model=MODEL_ID, prompt=PROMPT_IDS, max_tokens=6, temperature=0, logprobs=0,
                                     logit_bias={str(eos): 100},
                                     extra_body={"min_tokens": 4, "return_tokens_as_token_ids": True})
    held_ids = ids_of(held.choices[0].logprobs.tokens)
    assert len(held_ids) == 5 and eos not in held_ids[:4] and held.choices[0].finish_reason == "stop"


def test_health_and_grpc_logprobs(server, grpc_client):
    import json
    import urllib.request

    with urllib.request.urlopen(server.base_url.removesuffix("/v1") + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    res = grpc_client.generate(token_ids=PROMPT_IDS, max_new_tokens=3, ignore_eos=True, logprobs=True,
                               top_logprobs=2)
    assert [x.token_id for x in res.logprobs] == res.token_ids and all(len(x.top) == 2 for x in res.logprobs)
    chunks = list(grpc_client.stream(token_ids=PROMPT_IDS, max_new_tokens=3, ignore_eos=True, logprobs=True))
    assert [x.logprob for c in chunks for x in c.logprobs] == pytest.approx([x.logprob for x in res.logprobs])
    biased = grpc_client.generate(token_ids=PROMPT_IDS, max_new_tokens=3, ignore_eos=True, logit_bias={77: 100.0})
    assert biased.token_ids == [77, 77, 77] and not grpc_client.generate(token_ids=PROMPT_IDS).logprobs
    from clients import InvalidArgument

    for bad, fragment in (({"top_logprobs": 30}, "top_logprobs"), ({"presence_penalty": 5.0}, "presence_penalty"),
                          ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"min_p": 2.0}, "min_p"),
                          ({"logit_bias": {10**8: 1.0}}, "logit_bias"), ({"logit_bias": {5: 1000.0}}, "logit_bias"),
                          ({"min_tokens": 100, "max_new_tokens": 4}, "min_tokens")):
        with pytest.raises(InvalidArgument, match=fragment):
            grpc_client.generate(token_ids=PROMPT_IDS, **{"max_new_tokens": 4, **bad})
