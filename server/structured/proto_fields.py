"""The `constraint` field of a gRPC GenerateRequest (switchboard.v1.OutputConstraint) -> a Constraint."""

from __future__ import annotations

from server.structured.constraint import Constraint, ConstraintError


def constraint_of(req) -> Constraint | None:
    """req: switchboard.v1.GenerateRequest; None when it sets no constraint."""
    if not req.HasField("constraint"):
        return None
    c = req.constraint
    kind = c.WhichOneof("kind")
    where = f"constraint.{kind}"
    if kind is None:
        return None
    if kind == "json_schema":
        return Constraint.json_schema(c.json_schema, where)
    if kind == "json_object":
        if not c.json_object:
            raise ConstraintError("constraint.json_object must be true when set", where)
        return Constraint.json_object(where)
    if kind == "regex":
        return Constraint.regex(c.regex, where)
    if kind == "choice":
        return Constraint.choice(list(c.choice.options), where)
    return Constraint.grammar(c.grammar, where)
