"""Shared pieces of the structured-output tests: the real tokenizer's compiler and a set of JSON schemas."""

from __future__ import annotations

import functools

OBJ = {"type": "object", "additionalProperties": False}


def obj(props: dict, required: list[str] | None = None) -> dict:
    return {**OBJ, "properties": props, "required": list(props) if required is None else required}


# bounded schemas: a model (even a random one) completes them within a few dozen tokens
SCHEMAS: list[dict] = [
    obj({"ok": {"type": "boolean"}}),
    obj({"n": {"type": "integer", "minimum": 0, "maximum": 9}}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"a": {"type": "integer", "minimum": -5, "maximum": 5}, "b": {"type": "boolean"}}),
    obj({"inner": obj({"x": {"type": "integer", "minimum": 0, "maximum": 3}})}),
    obj({"xs": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3}}),
    obj({"v": {"anyOf": [{"type": "boolean"}, {"type": "null"}]}}),
    obj({"s": {"type": "string", "maxLength": 4, "pattern": "^[a-c]*$"}}),
    obj({"req": {"type": "boolean"}, "opt": {"type": "boolean"}}, required=["req"]),
    obj({"k": {"enum": [1, 2, 3]}, "t": {"const": "fixed"}}),
    obj({"pair": {"type": "array", "prefixItems": [{"type": "boolean"}, {"enum": ["p", "q"]}], "items": False}}),
    obj({"deep": obj({"deeper": obj({"leaf": {"enum": ["yes", "no"]}})})}),
    obj({"choice": {"anyOf": [obj({"kind": {"const": "a"}}), obj({"kind": {"const": "b"},
                                                                    "v": {"type": "boolean"}})]}}),
    obj({"grid": {"type": "array", "maxItems": 2, "items": {"type": "array", "maxItems": 2,
                                                              "items": {"enum": [0, 1]}}}}),
    obj({"num": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.5}}),
    obj({"name": {"type": "string", "minLength": 1, "maxLength": 3, "pattern": "^[xyz]+$"},
         "tags": {"type": "array", "items": {"enum": ["t1", "t2"]}, "maxItems": 2}}),
    obj({"level": {"type": "integer", "enum": [10, 20]}, "flag": {"type": ["boolean", "null"]}}),
    obj({"point": obj({"x": {"type": "integer", "minimum": 0, "maximum": 2},
                       "y": {"type": "integer", "minimum": 0, "maximum": 2}})}),
    obj({"mode": {"oneOf": [{"const": "on"}, {"const": "off"}]}}),
    obj({"empty": obj({})}),
]


@functools.cache
def tokenizer():
    from transformers import AutoTokenizer

    from server.model.checkpoint import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir(None))


@functools.cache
def compiler():
    from server.structured.compiler import GrammarCompiler

    tok = tokenizer()
    return GrammarCompiler(tok, len(tok))
