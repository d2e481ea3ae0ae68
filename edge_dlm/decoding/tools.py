"""Tool calls: OpenAI-style `tools` rendered into the prompt, the answer constrained to valid calls,
and the calls parsed back out of the text.

Rendering: a checkpoint whose chat template renders `tools` itself gets the tools and the messages as
they are (assistant `tool_calls`, `tool` messages). Otherwise the documented fallback (`docs/server.md`):
a system message listing the tools as JSON and asking for `<tool_call>{"name": ..., "arguments": {...}}
</tool_call>`, earlier calls written that way in the assistant's turn, tool results as a user turn
`<tool_response>...</tool_response>`.

Constraint (llguidance's Lark with inline JSON schemas, `controls.Constraint("lark", ...)`): with
`tool_choice` "auto" the answer is either plain text (not starting with '<') or one or more calls;
"required" only calls; a named function only calls of it; "none" no constraint and no tools
rendered. Each call's `arguments` match that function's JSON schema; with `parallel_tool_calls` false
at most one call.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edge_dlm.decoding.controls import COMPACT, Constraint
from edge_dlm.primitives.errors import UserError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOLS = 64
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_tools(tools: Any) -> list[dict]:
    """OpenAI's `tools` list, validated: `{"type": "function", "function": {"name", "description"?,
    "parameters"?}}`, names unique and well formed."""
    if not isinstance(tools, list) or not tools:
        raise UserError("'tools' must be a non-empty list of {type: function, function: {...}}")
    if len(tools) > MAX_TOOLS:
        raise UserError(f"at most {MAX_TOOLS} tools, got {len(tools)}")
    seen = set()
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise UserError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise UserError(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'")
        if name in seen:
            raise UserError(f"two tools are named {name!r}; tool names must be unique")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise UserError(f"tools[{i}].function.parameters must be a JSON schema object")
        desc = fn.get("description", "")
        if not isinstance(desc, str):
            raise UserError(f"tools[{i}].function.description must be a string")
        out.append({"type": "function", "function": {"name": name, "description": desc, "parameters": params}})
    return out


def check_choice(choice: Any, tools: list[dict]) -> str | None:
    """`tool_choice` -> "auto", "none", "required" or a function's name."""
    if choice is None:
        return "auto"
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in {t["function"]["name"] for t in tools}:
            raise UserError(f"tool_choice names {str(name)[:64]!r}, which is not in 'tools'")
        return name
    raise UserError("'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name'}}")


def render_messages(messages: list[dict], tools: list[dict] | None, template_knows_tools: bool) -> list[dict]:
    """Messages for a template that does not render tools itself (see the module docstring)."""
    if template_knows_tools:
        return messages
    out = []
    if tools:
        listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        out.append({"role": "system", "content": "You can call these tools:\n" + listing + "\nTo call one, answer "
                    f'{OPEN}{{"name": NAME, "arguments": {{...}}}}{CLOSE}, one per call.'})
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = "".join(OPEN + json.dumps({"name": c["function"]["name"],
                                               "arguments": json.loads(c["function"]["arguments"] or "{}")},
                                              ensure_ascii=False) + CLOSE for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (m.get("content") or "") + calls})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def constraint(tools: list[dict], choice: str, parallel: bool = True) -> Constraint | None:
    """The Lark grammar of an answer under `tool_choice` `choice` (None for "none")."""
    if choice == "none":
        return None
    fns = [t["function"] for t in tools if choice in ("auto", "required") or t["function"]["name"] == choice]
    schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                         "required": ["name", "arguments"], "additionalProperties": False} for f in fns],
              "x-guidance": COMPACT}
    call = f'"{OPEN}" %json{json.dumps(schema)} "{CLOSE}"'
    calls = "call+" if parallel else "call"
    start = f"start: {calls}" if choice != "auto" else f"start: {calls} | text\ntext: /[^<](.|\\n)*/"
    return Constraint("lark", f"{start}\ncall: {call}\n")


def parse_calls(text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
    """(content, calls) of an answer: calls as OpenAI's `{"name", "arguments": JSON text}`; content None
    when the answer is calls only."""
    names = {t["function"]["name"] for t in tools}
    calls, rest, at = [], [], 0
    for m in re.finditer(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), text, re.S):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("name") in names:
            rest.append(text[at:m.start()])
            at = m.end()
            calls.append({"name": obj["name"], "arguments": json.dumps(obj.get("arguments", {}), ensure_ascii=False)})
    rest.append(text[at:])
    content = "".join(rest).strip()
    return (content or None) if calls else text, calls
