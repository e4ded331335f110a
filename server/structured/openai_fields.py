"""The output-constraint fields of an OpenAI / vLLM request body -> one Constraint (or None).

Accepted, as vLLM's OpenAI server takes them:
    response_format: {"type": "text"} | {"type": "json_object"}
                     | {"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}}
    structured_outputs: {"json": schema | str, "regex": str, "choice": [str], "grammar": str,
                         "json_object": true}                          (vLLM >= 0.10; exactly one key)
    guided_json, guided_regex, guided_choice, guided_grammar           (older vLLM extras)
At most one of them may constrain the output (`response_format: text` constrains nothing). `strict` is
accepted either way: the schema is always enforced (as vLLM does). Errors are ConstraintError naming
the field; the HTTP layer turns them into 400s.
"""

from __future__ import annotations

from server.structured.constraint import Constraint, ConstraintError

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def _response_format(value: object) -> Constraint | None:
    param = "response_format"
    if not isinstance(value, dict):
        raise ConstraintError("'response_format' must be an object with a 'type'", param)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json_object(param)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise ConstraintError("'response_format.json_schema' must be an object with a 'schema'",
                                  "response_format.json_schema")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ConstraintError("'response_format.json_schema.strict' must be a boolean",
                                  "response_format.json_schema.strict")
        if "schema" not in spec:
            raise ConstraintError("'response_format.json_schema.schema' is required",
                                  "response_format.json_schema.schema")
        return Constraint.json_schema(spec["schema"], "response_format.json_schema.schema")
    raise ConstraintError(f"'response_format.type' must be one of text, json_object, json_schema, got {kind!r}",
                          "response_format.type")


def _structured_outputs(value: object) -> Constraint | None:
    param = "structured_outputs"
    if not isinstance(value, dict):
        raise ConstraintError("'structured_outputs' must be an object", param)
    given = [k for k in STRUCTURED_KEYS if value.get(k) not in (None, False)]
    if len(given) > 1:
        raise ConstraintError(f"'structured_outputs' sets {', '.join(given)}; set exactly one", param)
    if not given:
        return None
    key = given[0]
    where = f"{param}.{key}"
    if key == "json_object":
        if value[key] is not True:
            raise ConstraintError(f"'{where}' must be true", where)
        return Constraint.json_object(where)
    return {"json": Constraint.json_schema, "regex": Constraint.regex, "choice": Constraint.choice,
            "grammar": Constraint.grammar}[key](value[key], where)


def constraint_of(body: dict) -> Constraint | None:
    """The one constraint a request body asks for (None = free text)."""
    found: list[tuple[str, Constraint | None]] = []
    if body.get("response_format") is not None:
        found.append(("response_format", _response_format(body["response_format"])))
    if body.get("structured_outputs") is not None:
        found.append(("structured_outputs", _structured_outputs(body["structured_outputs"])))
    for name in GUIDED:
        if body.get(name) is not None:
            make = {"guided_json": Constraint.json_schema, "guided_regex": Constraint.regex,
                    "guided_choice": Constraint.choice, "guided_grammar": Constraint.grammar}[name]
            found.append((name, make(body[name], name)))
    active = [(name, c) for name, c in found if c is not None]
    if len(active) > 1:
        names = ", ".join(name for name, _ in active)
        raise ConstraintError(f"{names} each constrain the output; set only one", active[1][0])
    return active[0][1] if active else None
