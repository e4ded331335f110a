"""What a request constrains its output to, and the bounds a constraint must keep before it is compiled.

A `Constraint` is a frozen value (kind + canonical text), so it hashes as the compile cache's key.
`check()` runs the cheap structural bounds (sizes, nesting depth, enum sizes) in Python before any
grammar engine sees the constraint: a hostile schema is refused with InvalidRequest naming the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

from server.engine.request import InvalidRequest

MAX_SPEC_CHARS = 64 * 1024  # a schema / grammar / regex / choice list, as text
MAX_REGEX_CHARS = 4096
MAX_DEPTH = 24  # nesting of a JSON schema (objects and arrays inside each other)
MAX_ENUM = 1024  # values of one `enum` (and strings of a choice)
MAX_CHOICE_CHARS = 1024  # one choice string
MAX_SCHEMA_NODES = 5000  # dicts and lists in a schema


def short(message: str, limit: int = 400) -> str:
    """A grammar engine's message on one line, at most `limit` characters (they can quote a whole grammar)."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[:limit] + "..."


class ConstraintError(InvalidRequest):
    """An invalid or unsupported constraint (INVALID_ARGUMENT / HTTP 400); `param` names the request field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Kind(StrEnum):
    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"  # any JSON object
    REGEX = "regex"
    CHOICE = "choice"  # exactly one of a list of strings
    GRAMMAR = "grammar"  # Lark (llguidance's dialect) or GBNF (llama.cpp), told apart by the engine


@dataclass(frozen=True, slots=True)
class Constraint:
    kind: Kind
    spec: str  # json_schema: the schema as compact JSON (sorted keys); choice: a JSON list; regex/grammar: text
    param: str | None = None  # the request field it came from (error messages); not part of the key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Constraint) and (self.kind, self.spec) == (other.kind, other.spec)

    def __hash__(self) -> int:
        return hash((self.kind, self.spec))

    @staticmethod
    def json_schema(schema: object, param: str | None = None) -> Constraint:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ConstraintError(f"the JSON schema is not valid JSON: {exc}", param) from None
        if schema is False:
            raise ConstraintError("the JSON schema `false` accepts no value", param)
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}", param)
        _check_schema(schema, param)
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        if len(text) > MAX_SPEC_CHARS:
            raise ConstraintError(f"the JSON schema has {len(text)} characters; at most {MAX_SPEC_CHARS}", param)
        return Constraint(Kind.JSON_SCHEMA, text, param)

    @staticmethod
    def json_object(param: str | None = None) -> Constraint:
        return Constraint(Kind.JSON_OBJECT, '{"type":"object"}', param)

    @staticmethod
    def regex(pattern: object, param: str | None = None) -> Constraint:
        if not isinstance(pattern, str) or not pattern:
            raise ConstraintError("a regex must be a non-empty string", param)
        if len(pattern) > MAX_REGEX_CHARS:
            raise ConstraintError(f"the regex has {len(pattern)} characters; at most {MAX_REGEX_CHARS}", param)
        return Constraint(Kind.REGEX, pattern, param)

    @staticmethod
    def choice(options: object, param: str | None = None) -> Constraint:
        if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
            raise ConstraintError("a choice must be a non-empty list of strings", param)
        if len(options) > MAX_ENUM:
            raise ConstraintError(f"a choice has {len(options)} strings; at most {MAX_ENUM}", param)
        if any(not o for o in options):
            raise ConstraintError("a choice's strings must be non-empty", param)
        longest = max(map(len, options))
        if longest > MAX_CHOICE_CHARS:
            raise ConstraintError(f"a choice string has {longest} characters; at most {MAX_CHOICE_CHARS}", param)
        return Constraint(Kind.CHOICE, json.dumps(options, ensure_ascii=False), param)

    @staticmethod
    def grammar(text: object, param: str | None = None) -> Constraint:
        if not isinstance(text, str) or not text.strip():
            raise ConstraintError("a grammar must be a non-empty string (Lark or GBNF)", param)
        if len(text) > MAX_SPEC_CHARS:
            raise ConstraintError(f"the grammar has {len(text)} characters; at most {MAX_SPEC_CHARS}", param)
        return Constraint(Kind.GRAMMAR, text, param)


def _check_schema(schema: dict, param: str | None) -> None:
    """Depth, node count and enum sizes in one walk (keywords the grammar engine does not implement are
    refused by it when compiling, naming them)."""
    nodes = 0
    stack: list[tuple[object, int, str]] = [(schema, 0, "")]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, dict | list):
            nodes += 1
            if nodes > MAX_SCHEMA_NODES:
                raise ConstraintError(f"the JSON schema has more than {MAX_SCHEMA_NODES} objects and lists", param)
            if depth > MAX_DEPTH * 2:  # each schema level is a keyword dict plus a properties dict
                raise ConstraintError(f"the JSON schema nests deeper than {MAX_DEPTH} levels (at {path or '/'})",
                                      param)
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "enum" and isinstance(value, list) and len(value) > MAX_ENUM:
                    raise ConstraintError(f"an enum has {len(value)} values; at most {MAX_ENUM} (at {path or '/'})",
                                          param)
                stack.append((value, depth + 1, f"{path}/{key}"))
        elif isinstance(node, list):
            stack.extend((v, depth + 1, f"{path}/{i}") for i, v in enumerate(node))
