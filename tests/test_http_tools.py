"""Tool-call parsing, streaming hold-back and the fallback tool prompt (server/http/tools.py), without a server."""

from __future__ import annotations

import json

import pytest

from server.http.errors import ApiError
from server.http.tools import (
    ToolSpec,
    ToolStream,
    chat_message,
    parse_calls,
    parse_tools,
    stream_tail,
    with_tool_prompt,
)

F = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "x": {"type": "integer"}}}}}
G = {"type": "function", "function": {"name": "g"}}


def spec(choice="auto", **extra) -> ToolSpec:
    return parse_tools({"tools": [F, G], "tool_choice": choice, **extra})


def test_auto_parses_blocks_bare_objects_and_lists_and_leaves_text_alone():
    s = spec()
    content, calls = parse_calls('Sure. <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>', s)
    assert content == "Sure." and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] \
        == [("f", {"x": 1})]
    _, calls = parse_calls('{"name": "g", "arguments": "{}"}', s)
    assert calls[0]["function"] == {"name": "g", "arguments": "{}"}
    _, calls = parse_calls('[{"name": "f", "parameters": {"x": 2}}, {"name": "g", "arguments": {}}]', s)
    assert [c["function"]["name"] for c in calls] == ["f", "g"]
    for text in ("hello", '{"name": "unknown", "arguments": {}}', "<tool_call>not json</tool_call>", "[1, 2]"):
        assert parse_calls(text, s) == (text, [])


def test_named_and_required_outputs_become_calls():
    content, calls = parse_calls('{"x": 5}', spec({"type": "function", "function": {"name": "f"}}))
    assert content is None and calls[0]["function"] == {"name": "f", "arguments": '{"x": 5}'}
    _, calls = parse_calls('[{"name": "g", "parameters": {}}]', spec("required"))
    assert calls[0]["function"]["name"] == "g" and calls[0]["id"].startswith("call_")
    message, finish = chat_message('{"x": 5}', "length", spec({"type": "function", "function": {"name": "f"}}))
    assert finish == "length" and message["content"] == '{"x": 5}' and "tool_calls" not in message
    message, finish = chat_message("plain", "stop", spec("none"))
    assert finish == "stop" and message["content"] == "plain"


def test_required_constraint_bounds_parallel_calls():
    schema = json.loads(spec("required", parallel_tool_calls=False).constraint().spec)
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    assert "maxItems" not in json.loads(spec("required").constraint().spec)
    assert spec("auto").constraint() is None and spec("none").constraint() is None


def test_stream_holds_what_may_be_a_call_and_passes_plain_text():
    plain = ToolStream(spec())
    assert plain.feed("  ") == "" and plain.feed("Hi") == "  Hi" and plain.feed(" there") == " there"
    assert stream_tail(plain, "stop") == ({}, "stop")
    call = ToolStream(spec())
    for piece in ("<tool", "_call>", '{"name": "f", ', '"arguments": {"x": 3}}', "</tool_call>"):
        assert call.feed(piece) == ""
    delta, finish = stream_tail(call, "stop")
    assert finish == "tool_calls" and delta["tool_calls"][0]["index"] == 0
    assert json.loads(delta["tool_calls"][0]["function"]["arguments"]) == {"x": 3}
    cut = ToolStream(spec())
    cut.feed('{"name": "f"')
    assert stream_tail(cut, "length") == ({"content": '{"name": "f"'}, "length")


def test_fallback_prompt_lists_the_tools_and_renders_earlier_calls():
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
                {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    out = with_tool_prompt(messages, spec())
    assert out[0]["role"] == "system" and '"name": "f"' in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[2]["content"] == '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    assert all(set(m) == {"role", "content"} for m in out)


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": []}, "tools"),
    ({"tools": [F, F]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools[0].function.parameters"),
    ({"tools": [F], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [F], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tools_name_their_field(body, param):
    with pytest.raises(ApiError) as info:
        parse_tools(body)
    assert info.value.param == param and info.value.kind.status == 400
