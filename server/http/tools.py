"""Chat `tools` and `tool_choice`: parsing, the constraint they imply, rendering and parsing calls back.

tool_choice (default "auto" when tools are given, as OpenAI):
    none      tools rendered (as vLLM does), output is free text, never parsed as calls
    auto      free text; calls the model writes are parsed back: `<tool_call>{"name", "arguments"}</tool_call>`
              blocks (Hermes / Qwen style), or the whole output as one such JSON object or a list of them
    required  output constrained to a JSON list of calls [{"name": <a tool>, "parameters": <its schema>}, ...]
              (one call at most with parallel_tool_calls: false)
    {"type": "function", "function": {"name"}}  output constrained to that function's arguments (its schema)
as vLLM's OpenAI server does for `required` and named choices. Parsed calls become `message.tool_calls`
(streamed as one `delta.tool_calls` at the end) with finish_reason `tool_calls`.
Templates that render `tools` themselves get them (apply_chat_template(tools=...)); for the others a system
message lists the functions and the `<tool_call>` format.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from server.http.errors import invalid
from server.structured.constraint import Constraint, ConstraintError

MAX_TOOLS = 128
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
CALL_OPEN = "<tool_call>"


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments (an object schema)

    def openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True, slots=True)
class ToolSpec:
    tools: tuple[Tool, ...]
    choice: str  # none | auto | required | named
    named: str | None = None  # the function tool_choice names
    parallel: bool = True  # OpenAI's parallel_tool_calls: False = at most one call

    def constraint(self) -> Constraint | None:
        if self.choice == "named":
            tool = next(t for t in self.tools if t.name == self.named)
            return Constraint.json_schema(tool.parameters, f"tools[{self.named}].parameters")
        if self.choice == "required":
            calls = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                      "properties": {"name": {"const": t.name}, "parameters": t.parameters}} for t in self.tools]
            bound = {} if self.parallel else {"maxItems": 1}
            return Constraint.json_schema({"type": "array", "minItems": 1, **bound, "items": {"anyOf": calls}},
                                          "tools")
        return None

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"


def parse_tools(body: dict) -> ToolSpec | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise invalid("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise invalid("'tools' must be a non-empty list", "tools", "invalid_type")
    if len(tools) > MAX_TOOLS:
        raise invalid(f"'tools' has {len(tools)} entries; at most {MAX_TOOLS}", "tools")
    parsed = [_tool(t, i) for i, t in enumerate(tools)]
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise invalid("'tools' names must be unique", "tools")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise invalid("'parallel_tool_calls' must be a boolean", "parallel_tool_calls", "invalid_type")
    if choice is None or choice in ("none", "auto", "required"):
        spec = ToolSpec(tuple(parsed), choice or "auto", parallel=parallel)
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise invalid(f"'tool_choice' names function {name!r}, which is not in 'tools'", "tool_choice")
        spec = ToolSpec(tuple(parsed), "named", name, parallel)
    else:
        raise invalid("'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": "
                      "{\"name\": ...}}", "tool_choice")
    try:
        spec.constraint()  # the bounds of the schemas it implies, now (their compile comes later)
    except ConstraintError as exc:
        raise invalid(str(exc), exc.param) from None
    return spec


def _tool(t: object, i: int) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
        raise invalid(f"'{where}' must be {{\"type\": \"function\", \"function\": {{...}}}}", where, "invalid_type")
    f = t["function"]
    name = f.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise invalid(f"'{where}.function.name' must be 1-64 letters, digits, '_' or '-'", f"{where}.function.name")
    description = f.get("description") or ""
    if not isinstance(description, str):
        raise invalid(f"'{where}.function.description' must be a string", f"{where}.function.description")
    params = f.get("parameters")
    params = {"type": "object", "properties": {}} if params is None else params
    if not isinstance(params, dict):
        raise invalid(f"'{where}.function.parameters' must be a JSON schema object", f"{where}.function.parameters")
    return Tool(name, description, params)


def message_fields(m: dict, i: int) -> dict:
    """The tool fields of one chat message kept for the template: an assistant's `tool_calls`, a tool's id."""
    out: dict = {}
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                  for c in calls):
            raise invalid(f"'messages[{i}].tool_calls' must be a list of function calls", f"messages[{i}].tool_calls")
        out["tool_calls"] = [{"id": str(c.get("id", "")), "type": "function",
                              "function": {"name": str(c["function"].get("name", "")),
                                           "arguments": _arguments_text(c["function"].get("arguments"))}}
                             for c in calls]
    if isinstance(m.get("tool_call_id"), str):
        out["tool_call_id"] = m["tool_call_id"]
    return out


def _arguments_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value if value is not None else {})


def template_knows_tools(tokenizer) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def with_tool_prompt(messages: list[dict], spec: ToolSpec) -> list[dict]:
    """For a template that ignores `tools`: the functions in a system message, earlier calls as text."""
    listing = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in spec.tools)
    text = ("You can call these functions:\n" + listing + "\nTo call one, reply with "
            '<tool_call>{"name": <function name>, "arguments": <arguments object>}</tool_call>')
    out = []
    for m in messages:
        m = dict(m)
        for call in m.pop("tool_calls", None) or ():
            f = call["function"]
            m["content"] += f'{CALL_OPEN}{{"name": {json.dumps(f["name"])}, "arguments": {f["arguments"]}}}</tool_call>'
        m.pop("tool_call_id", None)
        out.append(m)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


def parse_calls(text: str, spec: ToolSpec) -> tuple[str | None, list[dict]]:
    """(content left, tool calls) from a finished output; ([text], []) when it holds no valid call."""
    names = {t.name for t in spec.tools}
    if spec.choice == "named":
        try:
            args = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        return None, [_call(spec.named, args)]
    if spec.choice == "required":
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        calls = [_call(c["name"], c["parameters"]) for c in items if isinstance(c, dict) and c.get("name") in names]
        return (None, calls) if calls else (text, [])
    blocks = _CALL_BLOCK.findall(text)
    candidates = blocks or [text.strip()]
    calls = []
    for raw in candidates:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            continue
        for c in value if isinstance(value, list) else [value]:
            if isinstance(c, dict) and c.get("name") in names:
                args = c.get("arguments", c.get("parameters", {}))
                calls.append(_call(c["name"], json.loads(args) if isinstance(args, str) else args))
    if not calls:
        return text, []
    rest = _CALL_BLOCK.sub("", text).strip() if blocks else ""
    return rest or None, calls


def _call(name: str, args: object) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


class ToolStream:
    """One streamed choice: text passes through until it could be a call, then it is held to the end."""

    def __init__(self, spec: ToolSpec) -> None:
        self.spec = spec
        self.held = ""
        self.passing = spec.choice == "none"  # True once the output is plainly not a call

    def feed(self, text: str) -> str:
        """The content to send now."""
        if self.passing:
            return text
        self.held += text
        if self.spec.choice in ("named", "required"):
            return ""
        head = self.held.lstrip()
        if not head or CALL_OPEN.startswith(head[: len(CALL_OPEN)]) or head.startswith(("{", "[", CALL_OPEN)):
            return ""
        self.passing, out, self.held = True, self.held, ""
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content still to send, tool calls) once the choice ended."""
        if self.passing or not self.held:
            return self.held, []
        content, calls = parse_calls(self.held, self.spec)
        return (content or ""), calls


def chat_message(text: str, finish_reason: str | None, spec: ToolSpec | None) -> tuple[dict, str | None]:
    """The unary `message` of a finished choice and its finish_reason (`tool_calls` when calls were parsed)."""
    message = {"role": "assistant", "content": text, "refusal": None}
    if spec is None or not spec.parses_calls or finish_reason != "stop":
        return message, finish_reason
    content, calls = parse_calls(text, spec)
    if not calls:
        return message, finish_reason
    return {**message, "content": content, "tool_calls": calls}, "tool_calls"


def stream_tail(stream: ToolStream, finish_reason: str | None) -> tuple[dict, str | None]:
    """The last delta of a streamed choice (held content and/or `tool_calls`, each with its `index`)."""
    if finish_reason != "stop":
        return ({"content": stream.held} if stream.held else {}), finish_reason
    content, calls = stream.finish()
    delta: dict = {"content": content} if content else {}
    if calls:
        delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
        return delta, "tool_calls"
    return delta, finish_reason
