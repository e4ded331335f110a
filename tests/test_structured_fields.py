"""Request fields -> constraints: OpenAI / vLLM body fields, the gRPC OutputConstraint, the client and CLI."""

from __future__ import annotations

import json

import pytest

from clients.__main__ import _generation_kwargs, parse_args
from clients.messages import generate_request
from server.structured.constraint import Constraint, ConstraintError, Kind
from server.structured.openai_fields import constraint_of
from server.structured.proto_fields import constraint_of as proto_constraint_of

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize(("body", "want"), [
    ({}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, Constraint.json_object()),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     Constraint.json_schema(SCHEMA)),
    ({"guided_json": json.dumps(SCHEMA)}, Constraint.json_schema(SCHEMA)),
    ({"guided_regex": "[a-z]+"}, Constraint.regex("[a-z]+")),
    ({"guided_choice": ["a", "b"]}, Constraint.choice(["a", "b"])),
    ({"guided_grammar": 'root ::= "x"'}, Constraint.grammar('root ::= "x"')),
    ({"structured_outputs": {"json": SCHEMA}}, Constraint.json_schema(SCHEMA)),
    ({"structured_outputs": {"json_object": True}}, Constraint.json_object()),
    ({"structured_outputs": {"choice": ["y"]}, "response_format": {"type": "text"}}, Constraint.choice(["y"])),
])
def test_openai_fields(body, want):
    assert constraint_of(body) == want


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA, "strict": "yes"}}},
     "response_format.json_schema.strict"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object"),
    ({"structured_outputs": {"regex": 5}}, "structured_outputs.regex"),
    ({"guided_json": SCHEMA, "response_format": {"type": "json_object"}}, "guided_json"),
])
def test_bad_openai_fields_name_their_field(body, param):
    with pytest.raises(ConstraintError) as info:
        constraint_of(body)
    assert info.value.param == param


@pytest.mark.parametrize(("options", "kind", "spec"), [
    ({"json_schema": SCHEMA}, Kind.JSON_SCHEMA, Constraint.json_schema(SCHEMA).spec),
    ({"json_schema": json.dumps(SCHEMA)}, Kind.JSON_SCHEMA, Constraint.json_schema(SCHEMA).spec),
    ({"json_object": True}, Kind.JSON_OBJECT, Constraint.json_object().spec),
    ({"regex": "[0-9]+"}, Kind.REGEX, "[0-9]+"),
    ({"choice": ["l", "r"]}, Kind.CHOICE, '["l", "r"]'),
    ({"grammar": "start: /a+/"}, Kind.GRAMMAR, "start: /a+/"),
])
def test_client_options_round_trip_through_the_proto(options, kind, spec):
    req = generate_request("x", **options)
    c = proto_constraint_of(req)
    assert (c.kind, c.spec) == (kind, spec)
    assert proto_constraint_of(generate_request("x")) is None


def test_client_refuses_two_constraints_and_cli_flags_map():
    with pytest.raises(TypeError, match="at most one"):
        generate_request("x", regex="a", choice=["a"])
    args = parse_args(["generate", "hi", "--choice", "yes", "--choice", "no"])
    assert proto_constraint_of(generate_request(**_generation_kwargs(args))) == Constraint.choice(["yes", "no"])
    args = parse_args(["generate", "hi", "--raw", "--json-schema", json.dumps(SCHEMA)])
    assert proto_constraint_of(generate_request(**_generation_kwargs(args))) == Constraint.json_schema(SCHEMA)
    with pytest.raises(SystemExit):
        parse_args(["generate", "hi", "--regex", "a", "--json-object"])
