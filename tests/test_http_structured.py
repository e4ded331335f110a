"""Structured output and tool calls end to end, through the official `openai` client and gRPC (issue 32).

One server (tiny random Llama with real tokenizer, several adapter kinds) takes concurrent constrained
requests; every finished output is checked by `jsonschema` / `re.fullmatch` / the function's parameters
schema. Bad constraints are 400 / INVALID_ARGUMENT naming the problem, and the server keeps serving.
The embedded default model (SmolLM2-135M) runs one batched test, marked slow.
"""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import jsonschema
import openai
import pytest

from clients.errors import SwitchboardError
from tests.adapter_files import peft_adapter
from tests.http_utils import MODEL_ID, running_http_server
from tests.structured_utils import SCHEMAS

pytestmark = pytest.mark.timeout(600)
CHAT = [{"role": "user", "content": "Reply in JSON."}]
ADAPTERS = ("base", "lora1", "prompt1", "prefix1")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "additionalProperties": False,
                                                           "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                                          "days": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 3}},
                                                           "required": ["city", "days"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "properties": {"utc": {"type": "boolean"}}, "required": ["utc"]}}}


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with running_http_server(tiny_llama_dir, tenants=["acme"]) as s:
        reg = s.grpc.registry
        reg.create("acme", "lora1", peft_adapter(tiny_llama_dir, "lora", rank=4, seed=71))
        reg.create("acme", "prompt1", peft_adapter(tiny_llama_dir, "prompt", seed=72))
        reg.create("acme", "prefix1", peft_adapter(tiny_llama_dir, "prefix", seed=73))
        yield s


def schema_format(schema: dict, i: int) -> dict:
    return {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}


async def _json_batch(client, schemas, adapters, max_tokens=128):
    async def one(i, schema):
        return await client.chat.completions.create(
            model=adapters[i % len(adapters)], messages=CHAT, max_tokens=max_tokens, temperature=1.0, seed=i,
            response_format=schema_format(schema, i), n=2 if i % 5 == 0 else 1)
    return await asyncio.gather(*(one(i, s) for i, s in enumerate(schemas)))


def test_json_schemas_across_adapters_in_one_concurrent_batch(server):
    client = server.openai("acme", async_=True)
    results = asyncio.run(_json_batch(client, SCHEMAS, ADAPTERS))
    finished = 0
    for schema, r in zip(SCHEMAS, results, strict=True):
        for choice in r.choices:
            if choice.finish_reason == "stop":
                jsonschema.validate(json.loads(choice.message.content), schema)
                finished += 1
            else:
                assert choice.finish_reason == "length"
    assert finished >= len(SCHEMAS)  # bounded schemas: all of them finish here


def test_regex_choice_grammar_and_json_object_fields(server):
    client = server.openai("acme")
    cases = [
        ({"guided_regex": r"[0-9]{3}-[a-z]{2}"}, r"[0-9]{3}-[a-z]{2}"),
        ({"structured_outputs": {"regex": r"(yes|no), [A-Z]"}}, r"(yes|no), [A-Z]"),
        ({"guided_choice": ["cat", "dog", "emu"]}, r"cat|dog|emu"),
        ({"structured_outputs": {"choice": ["up", "down"]}}, r"up|down"),
        ({"guided_grammar": 'root ::= "(" [xy] ")"'}, r"\([xy]\)"),
        ({"structured_outputs": {"grammar": 'start: "<" /[0-9]/ ">"'}}, r"<[0-9]>"),
    ]
    for i, (extra, pattern) in enumerate(cases):
        r = client.chat.completions.create(model=ADAPTERS[i % 4], messages=CHAT, max_tokens=24, temperature=1.0,
                                           seed=i, extra_body=extra)
        assert r.choices[0].finish_reason == "stop" and re.fullmatch(pattern, r.choices[0].message.content), extra
    r = client.completions.create(model="lora1", prompt="JSON:", max_tokens=24, temperature=0,
                                  extra_body={"guided_json": SCHEMAS[2]})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS[2])
    r = client.chat.completions.create(model="base", messages=CHAT, max_tokens=6, temperature=1.0, seed=3,
                                       response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))
    r = client.chat.completions.create(model="base", messages=CHAT, max_tokens=3, temperature=0,
                                       response_format=schema_format(SCHEMAS[16], 16))
    assert r.choices[0].finish_reason == "length"  # cannot complete in 3 tokens: never claimed complete


def test_streaming_a_constrained_output_equals_unary(server):
    client = server.openai("acme")
    kwargs = dict(model="prompt1", messages=CHAT, max_tokens=64, temperature=0,
                  response_format=schema_format(SCHEMAS[11], 11))
    want = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.message.content and chunks[-1].choices[0].finish_reason == want.finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMAS[11])


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


def test_tool_calls_named_required_and_streamed(server):
    client = server.openai("acme")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for i, adapter in enumerate(ADAPTERS):
        named = client.chat.completions.create(
            model=adapter, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER, CLOCK],
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=64, temperature=1.0,
            seed=i)
        assert named.choices[0].finish_reason == "tool_calls" and named.choices[0].message.content is None
        [(name, args)] = _calls(named.choices[0].message)
        assert name == "get_weather"
        jsonschema.validate(args, schemas[name])
        required = client.chat.completions.create(
            model=adapter, messages=[{"role": "user", "content": "What time is it?"}], tools=[WEATHER, CLOCK],
            tool_choice="required", parallel_tool_calls=False, max_tokens=128, temperature=1.0, seed=i)
        assert required.choices[0].finish_reason == "tool_calls"
        calls = _calls(required.choices[0].message)
        assert len(calls) == 1 and all(jsonschema.validate(a, schemas[n]) is None for n, a in calls)
        assert len({c.id for c in required.choices[0].message.tool_calls}) == len(calls)
    chunks = list(client.chat.completions.create(
        model="lora1", messages=[{"role": "user", "content": "Time?"}], tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=32, temperature=0,
        stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].function.name == "get_time" and deltas[0].id.startswith("call_")
    jsonschema.validate(json.loads(deltas[0].function.arguments), schemas["get_time"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    free = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                          tools=[WEATHER], tool_choice="none", max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert free.choices[0].message.tool_calls is None and free.choices[0].finish_reason == "length"
    follow_up = client.chat.completions.create(model="base", max_tokens=4, temperature=0, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    assert follow_up.choices[0].finish_reason in ("stop", "length", "tool_calls")


BAD_HTTP = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, "nope"),
    ({"guided_regex": "a(?=b)"}, "look-around"),
    ({"guided_choice": []}, "non-empty"),
    ({"guided_grammar": "start: start"}, "terminal"),
    ({"guided_json": '{"type": '}, "not valid JSON"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "only one"),
    ({"guided_json": {"enum": list(range(5000))}}, "enum"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "constrains the output"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
    ({"tool_choice": "required"}, "needs 'tools'"),
]


def test_bad_constraints_are_400_and_the_server_keeps_serving(server):
    import urllib.error
    import urllib.request

    key = server.grpc.keys["acme"]
    for extra, words in BAD_HTTP:
        body = {"model": "base", "messages": CHAT, "max_tokens": 4, **extra}
        req = urllib.request.Request(f"{server.base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=60)
        assert info.value.code == 400, extra
        error = json.loads(info.value.read())["error"]
        assert words.lower() in (error["message"] + " " + str(error["param"])).lower(), (extra, error)
    client = server.openai("acme")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="base", prompt="x", max_tokens=4, extra_body={"guided_regex": "("})
    r = client.chat.completions.create(model="base", messages=CHAT, max_tokens=24, temperature=0,
                                       extra_body={"guided_choice": ["still", "serving"]})
    assert r.choices[0].message.content in ("still", "serving")


def test_grpc_constraints_and_invalid_argument(server):
    with server.grpc.client("acme", timeout=120) as c:
        for i, schema in enumerate(SCHEMAS[:8]):
            r = c.generate(messages=CHAT, adapter=("", "lora1", "prompt1", "prefix1")[i % 4], max_new_tokens=128,
                           temperature=1.0, seed=i, json_schema=schema)
            assert r.finish_reason == "stop", r.text
            jsonschema.validate(json.loads(r.text), schema)
        r = c.generate("x", regex=r"[a-f]{4}", max_new_tokens=16, temperature=1.0, seed=1)
        assert re.fullmatch(r"[a-f]{4}", r.text)
        r = c.generate("x", choice=["left", "right"], max_new_tokens=16)
        assert r.text in ("left", "right")
        text = "".join(chunk.text for chunk in c.stream("x", grammar='root ::= "[" [0-9] "]"', max_new_tokens=16))
        assert re.fullmatch(r"\[[0-9]\]", text)
        for bad in ({"regex": "(a"}, {"json_schema": '{"type": "integer", "minimum": 3, "maximum": 1}'},
                    {"grammar": "start: start"}):
            with pytest.raises(SwitchboardError) as info:
                c.generate("x", max_new_tokens=4, **bad)
            assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT, info.value


@pytest.mark.slow
def test_default_model_json_and_tools_through_openai(default_model_dir):
    with running_http_server(default_model_dir, tenants=["acme"]) as s:
        s.grpc.registry.create("acme", "lora1", peft_adapter(default_model_dir, "lora", rank=4, seed=81))
        client = s.openai("acme", async_=True)
        schemas = SCHEMAS[:6]
        results = asyncio.run(_json_batch(client, schemas, (MODEL_ID, "lora1"), max_tokens=96))
        for schema, r in zip(schemas, results, strict=True):
            for choice in r.choices:
                assert choice.finish_reason == "stop", choice.message.content
                jsonschema.validate(json.loads(choice.message.content), schema)
        r = s.openai("acme").chat.completions.create(
            model="lora1", messages=[{"role": "user", "content": "What's the weather in Paris for 2 days?"}],
            tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False, max_tokens=96, temperature=0)
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0].message.content
        [(name, args)] = _calls(r.choices[0].message)
        jsonschema.validate(args, {"get_weather": WEATHER, "get_time": CLOCK}[name]["function"]["parameters"])


def test_a_compiling_constraint_delays_only_its_own_request(server, monkeypatch):
    import threading

    grammars = server.grpc.engine.grammars
    release, started = threading.Event(), threading.Event()
    real = grammars._build

    def slow_build(c):
        if "slowpoke" in c.spec:
            started.set()
            release.wait(60)
        return real(c)

    monkeypatch.setattr(grammars, "_build", slow_build)
    client = server.openai("acme")
    result = {}

    def constrained():
        result["r"] = client.chat.completions.create(model="base", messages=CHAT, max_tokens=16, temperature=0,
                                                     extra_body={"guided_choice": ["slowpoke", "fast"]})

    thread = threading.Thread(target=constrained)
    thread.start()
    try:
        assert started.wait(60)
        for extra in ({}, {"guided_regex": "[a-z]{3}"}):  # free text, and a constraint already compiling elsewhere
            r = client.chat.completions.create(model="lora1", messages=CHAT, max_tokens=4, temperature=0,
                                               extra_body=extra)
            assert r.choices[0].finish_reason in ("stop", "length")
        assert thread.is_alive() and "r" not in result  # still waiting for its own compile
    finally:
        release.set()
        thread.join(60)
    assert result["r"].choices[0].message.content in ("slowpoke", "fast")
