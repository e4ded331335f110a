"""A chat / completion body's output constraint and tools, compiled off the event loop before queueing.

`output_spec(body)` reads response_format / structured_outputs / guided_* (server.structured.openai_fields)
and tools / tool_choice (server.http.tools); `compile_output()` compiles the one constraint on the engine's
grammar compiler (a worker thread; the cache makes a repeated constraint free), so a bad or too slow
constraint is a 400 naming its field before the request takes a tenant slot or a queue place.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.http.errors import invalid
from server.http.tools import ToolSpec, parse_tools, template_knows_tools, with_tool_prompt
from server.prompting import PromptTokenizer
from server.structured.constraint import Constraint, ConstraintError
from server.structured.openai_fields import constraint_of


@dataclass(frozen=True, slots=True)
class OutputSpec:
    constraint: Constraint | None = None  # what the output is held to (from the fields or from tool_choice)
    tools: ToolSpec | None = None  # chat tools; calls parsed back when tool_choice is not none


def output_spec(body: dict, chat: bool) -> OutputSpec:
    try:
        constraint = constraint_of(body)
    except ConstraintError as exc:
        raise invalid(str(exc), exc.param) from None
    tools = parse_tools(body) if chat else None
    if not chat and body.get("tools") is not None:
        raise invalid("'tools' is a chat completions parameter", "tools")
    implied = tools.constraint() if tools is not None else None
    if implied is not None and constraint is not None:
        raise invalid(f"tool_choice '{tools.choice}' constrains the output already; drop {constraint.param}",
                      constraint.param)
    return OutputSpec(constraint or implied, tools)


async def compile_output(engine, spec: OutputSpec) -> Constraint | None:
    """The constraint for the engine requests (None: free text), compiled on the compiler's worker thread first
    (the event loop awaits it) so that a bad one is a 400 here and the engine's submit finds it in the cache."""
    if spec.constraint is None:
        return None
    try:
        await engine.grammars.compile_async(spec.constraint)
    except ConstraintError as exc:
        raise invalid(str(exc), exc.param) from None
    return spec.constraint


def render_chat(prompts: PromptTokenizer, messages: list[dict], tools: ToolSpec | None, hint: str) -> list[int]:
    """Chat token ids; the tools rendered by the template when it knows them, else by a system message."""
    if tools is None:
        return prompts.chat([{"role": m["role"], "content": m["content"]} for m in messages], hint)
    if template_knows_tools(prompts.tokenizer):
        return prompts.chat(messages, hint, tools=[t.openai() for t in tools.tools])
    return prompts.chat(with_tool_prompt(messages, tools), hint)
