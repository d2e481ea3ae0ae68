"""The OpenAI-compatible request schema of `edge-dlm serve`, validated strictly.

`parse_request(kind, body, ...)` turns a JSON body into a `Request` (prompt + the keyword arguments
of `Runtime.stream`, the core's options: this module only maps fields) or raises `BadRequest` with one
line naming the field. Every field is type- and range-checked and, as OpenAI does, an unknown field is
refused ("Unrecognized request argument supplied"). OpenAI's fields: stop, n (up to `MAX_N`),
presence / frequency penalties, logit_bias, logprobs / top_logprobs, response_format (json_object,
json_schema), tools / tool_choice / parallel_tool_calls and `tool` messages, echo, stream_options.
edge-dlm's own (and llama.cpp's / vLLM's): `mode`, `steps`, `threshold`, `block_size`, `top_k`,
`repeat_penalty`, `repeat_last_n`, `min_tokens`, `ignore_eos`, `regex`, `grammar` (Lark). What vLLM's
and llama.cpp's clients send is taken too (`_foreign`): their names for these controls
(`repetition_penalty`, `n_predict`, `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`,
a top-level `json_schema`), hosted-API hints that change nothing here (`store`, `metadata`, ...), and
controls edge-dlm lacks at their no-op value only (`min_p: 0`, `typical_p: 1`, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from edge_dlm.decoding import MODES

ROLES = ("system", "user", "assistant", "tool")
MAX_N = 8  # completions per request
COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stream",
          "stream_options", "n", "stop", "user", "presence_penalty", "frequency_penalty", "logprobs",
          "top_logprobs", "logit_bias", "response_format", "mode", "steps", "threshold", "block_size",
          "repeat_penalty", "repeat_last_n", "min_tokens", "ignore_eos", "regex", "grammar"}
FILL = {"model", "user", "temperature", "top_p", "top_k", "seed", "steps", "threshold", "block_size"}
FIELDS = {"chat": COMMON | {"messages", "tools", "tool_choice", "parallel_tool_calls"},
          "completion": COMMON | {"prompt", "echo", "best_of", "suffix"},
          "edit": FILL | {"input", "spans", "stream"}}


# What other servers' clients send, beside OpenAI's own fields. Renamed onto ours: vLLM's and llama.cpp's
# names for the same controls, vLLM's guided decoding, llama.cpp's top-level JSON schema. Accepted and
# unused: fields that change nothing a request here decodes (storage, routing, caching and tracing hints
# for a hosted API or another server). Accepted at their no-op value only: controls edge-dlm does not
# have (another value is a 400 naming it: the output would not be what the client asked for).
RENAMED = {"repetition_penalty": "repeat_penalty", "n_predict": "max_tokens", "guided_regex": "regex",
           "guided_grammar": "grammar"}
UNUSED = {"store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier", "cache_prompt", "id_slot",
          "timings_per_token", "reasoning_effort", "verbosity", "prediction", "skip_special_tokens",
          "spaces_between_special_tokens", "return_tokens", "web_search_options"}
NO_OP = {"min_p": (0, 0.0), "typical_p": (1, 1.0), "add_generation_prompt": (True,),
         "include_stop_str_in_output": (False,), "modalities": (["text"],), "chat_template_kwargs": ({},),
         "functions": ([],), "function_call": ("none", "auto")}


def _foreign(body: dict) -> dict:
    """`body` with other servers' names for our fields renamed (`RENAMED`, `guided_json`,
    `guided_choice`, a top-level `json_schema`), the unused fields dropped (`UNUSED`) and controls we
    lack accepted only at their no-op value (`NO_OP`)."""
    out = {k: v for k, v in body.items() if k not in UNUSED}
    for k, values in NO_OP.items():
        if k in out:
            v = out.pop(k)
            if not any(v == ok and type(v) is type(ok) for ok in values):
                hint = " (send 'tools' / 'tool_choice')" if k.startswith("function") else ""
                raise BadRequest(f"'{k}' is not supported here{hint}; accepted only as {values[0]!r}")
    for theirs, ours in RENAMED.items():
        if theirs in out:
            if ours in out:
                raise BadRequest(f"'{theirs}' and '{ours}' name the same control; send one")
            out[ours] = out.pop(theirs)
    schema = [k for k in ("guided_json", "json_schema") if k in out]
    if "guided_choice" in out:
        choices = out.pop("guided_choice")
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
            raise BadRequest("'guided_choice' must be a non-empty list of strings")
        if "regex" in out:
            raise BadRequest("'guided_choice' and 'regex' both constrain the output; send one")
        import re

        out["regex"] = "|".join(f"({re.escape(c)})" for c in choices)
    if schema:
        if len(schema) > 1 or "response_format" in out:
            raise BadRequest(f"'{schema[0]}' and 'response_format' both constrain the output; send one")
        v = out.pop(schema[0])
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError:
                raise BadRequest(f"'{schema[0]}' must be a JSON schema (an object or its JSON text)") from None
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "schema", "schema": v}}
    return out


class BadRequest(Exception):
    """A request the client must fix (HTTP 400); `str()` is one line."""


@dataclasses.dataclass
class Request:
    prompt: str | list[dict[str, str]] | list[int]
    raw: bool  # a completion prompt is sent as is, a chat is templated
    kwargs: dict[str, Any]  # for Runtime.stream / infill_stream / edit_stream
    stream: bool
    include_usage: bool  # stream_options.include_usage
    call: str = "stream"  # which Runtime method: stream, infill (a completion with a suffix), edit
    suffix: str | list[int] | None = None
    spans: list[tuple[int, int]] | None = None
    n: int = 1
    echo: bool = False
    logprobs: int | None = None  # how many top logprobs per token (0: the token's own only); None: off
    tools: bool = False  # tools were offered: answers may carry tool calls
    ignored: tuple[str, ...] = ()  # fields / options accepted unread (Ollama's API: as Ollama does), for the log


def _int(body: dict, key: str, lo: int, hi: int | None = None, default: Any = None) -> Any:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        raise BadRequest(f"'{key}' must be an integer, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        raise BadRequest(f"'{key}' must be in {lo}..{hi if hi is not None else 'inf'}, got {v}")
    return v


def _num(body: dict, key: str, lo: float, hi: float, default: Any = None, lo_open: bool = False) -> Any:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise BadRequest(f"'{key}' must be a number, got {type(v).__name__}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise BadRequest(f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return v


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequest(f"'{key}' must be true or false, got {type(v).__name__}")
    return v


def _refuse_unless(body: dict, key: str, ok, why: str) -> None:
    if key in body and body[key] is not None and not ok(body[key]):
        raise BadRequest(f"'{key}' {why}")


def _messages(v: Any) -> list[dict[str, Any]]:
    if not isinstance(v, list) or not v:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
    out = []
    called: set[str] = set()  # the ids of the tool calls so far: a `tool` message answers one of them
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content'")
        extra = set(m) - {"role", "content", "name", "tool_calls", "tool_call_id", "refusal"}
        if extra:
            raise BadRequest(f"messages[{i}] has unsupported fields: {', '.join(sorted(map(str, extra)))}")
        role, content = m.get("role"), m.get("content")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {str(role)[:40]!r}")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"messages[{i}].content parts must all be {{'type': 'text', 'text': str}}")
            content = "".join(p["text"] for p in content)
        calls = m.get("tool_calls")
        if content is None and role == "assistant" and calls:
            content = ""
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        msg: dict[str, Any] = {"role": role, "content": content}
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("function"), dict)
                    and isinstance(c["function"].get("name"), str)
                    and isinstance(c["function"].get("arguments", "{}"), str) for c in calls):
                raise BadRequest(f"messages[{i}].tool_calls must be a list of {{id, type, function: {{name, "
                                 "arguments}}}} on an assistant message")
            for c in calls:
                try:
                    json.loads(c["function"].get("arguments") or "{}")
                except ValueError:
                    raise BadRequest(f"messages[{i}].tool_calls: arguments of {c['id'][:40]!r} are not JSON") from None
            called |= {c["id"] for c in calls}
            msg["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                "name": c["function"]["name"], "arguments": c["function"].get("arguments") or "{}"}} for c in calls]
        if role == "tool":
            cid = m.get("tool_call_id")
            if not isinstance(cid, str) or cid not in called:
                raise BadRequest(f"messages[{i}] is a tool result whose tool_call_id {str(cid)[:40]!r} answers no "
                                 "earlier assistant tool call")
            msg["tool_call_id"] = cid
        out.append(msg)
    if not any(m["content"].strip() or m.get("tool_calls") for m in out):
        raise BadRequest("every message is empty")
    return out


def _prompt(v: Any, vocab: int) -> str | list[int]:
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        v = v[0]  # a batch of one
    if isinstance(v, str):
        if not v.strip():
            raise BadRequest("'prompt' is empty")
        return v
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        bad = [t for t in v if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"'prompt' holds token id {bad[0]}, outside the vocabulary (0..{vocab - 1})")
        return v
    raise BadRequest("'prompt' must be a non-empty string or a list of token ids (one prompt per request)")


def _controls(body: dict, vocab: int) -> dict[str, Any]:
    """Stop sequences, penalties, logit bias, EOS rules and a response format: core options."""
    kw: dict[str, Any] = {"stop": _stop(body.get("stop")),
                          "presence_penalty": _num(body, "presence_penalty", -2.0, 2.0),
                          "frequency_penalty": _num(body, "frequency_penalty", -2.0, 2.0),
                          "repeat_penalty": _num(body, "repeat_penalty", 0.0, 10.0, lo_open=True),
                          "repeat_last_n": _int(body, "repeat_last_n", -1, 1 << 20),
                          "min_tokens": _int(body, "min_tokens", 0, 1 << 20),
                          "ignore_eos": _bool(body, "ignore_eos") or None}
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict) or len(bias) > 1024:
            raise BadRequest("'logit_bias' must be an object of at most 1024 {token id: bias} entries")
        out = {}
        for k, v in bias.items():
            if not (isinstance(k, str) and k.isdigit() and int(k) < vocab):
                raise BadRequest(f"'logit_bias' key {str(k)[:20]!r} is not a token id (0..{vocab - 1})")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise BadRequest(f"'logit_bias' values must be numbers in -100..100, got {str(v)[:20]}")
            out[int(k)] = float(v)
        kw["logit_bias"] = out or None
    kw.update(response_format(body.get("response_format")))
    for key in ("regex", "grammar"):
        if body.get(key) is not None:
            if not isinstance(body[key], str) or not body[key]:
                raise BadRequest(f"'{key}' must be a non-empty string")
            if any(k in kw for k in ("json", "json_schema")) or (key == "grammar" and "regex" in kw):
                raise BadRequest(f"'{key}' and 'response_format' cannot be combined; drop one")
            kw[key] = body[key]
    return {k: v for k, v in kw.items() if v is not None}


def _stop(v: Any) -> tuple[str, ...] | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise BadRequest("'stop' must be a string or a list of strings")
    from edge_dlm.decoding.controls import MAX_STOP_LEN, MAX_STOPS

    if len(v) > MAX_STOPS or any(len(s) > MAX_STOP_LEN for s in v):
        raise BadRequest(f"'stop' takes at most {MAX_STOPS} sequences of at most {MAX_STOP_LEN} characters")
    return tuple(s for s in v if s) or None


def response_format(v: Any) -> dict[str, Any]:
    """OpenAI's `response_format` -> the core's constraint keywords."""
    if v is None or v == {"type": "text"}:
        return {}
    if not isinstance(v, dict) or v.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest("'response_format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}")
    if v["type"] == "json_object":
        return {"json": True}
    if v["type"] == "text":
        return {}
    spec = v.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise BadRequest("'response_format.json_schema' must be {'name': ..., 'schema': {...}, 'strict': bool}")
    return {"json_schema": spec.get("schema", {"type": "object"})}


def _sampling(body: dict, vocab: int) -> dict[str, Any]:
    return {"temperature": _num(body, "temperature", 0.0, 2.0, 0.0),
            "top_p": _num(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
            "top_k": _int(body, "top_k", 0, vocab, 0),
            "seed": _int(body, "seed", -2**63, 2**63 - 1),
            "block_size": _int(body, "block_size", 1, 64),
            "steps": _int(body, "steps", 1, 64),
            "threshold": _num(body, "threshold", 0.0, 1.0, 0.9)}


def _edit(body: dict, vocab: int) -> Request:
    """`/v1/edits`: {"input": text, "spans": [[start, end], ...]} plus the denoising options."""
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("'input' must be a non-empty string")
    spans = body.get("spans")
    if not (isinstance(spans, list) and spans and all(
            isinstance(sp, list) and len(sp) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in sp)
            for sp in spans)):
        raise BadRequest("'spans' must be a non-empty list of [start, end] character offsets")
    if _bool(body, "stream"):
        raise BadRequest("edits are not streamed; drop 'stream'")
    for key in ("model", "user"):
        _refuse_unless(body, key, lambda v: isinstance(v, str), "must be a string")
    kw = {k: v for k, v in _sampling(body, vocab).items() if v is not None}
    return Request(text, True, kw, False, False, call="edit", spans=[tuple(sp) for sp in spans])


def parse_request(kind: str, body: Any, *, default_mode: str, context: int, vocab: int, block: int = 32,
                  default_steps: int | None = None) -> Request:
    """Validate an OpenAI-style `body` for `kind` "chat", "completion" or "edit".

    A request naming no mode, or "auto", runs `default_mode` (with `default_steps` when that is diffusion
    and the request sets no steps): what the server resolved at start."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    body = _foreign(body)
    unknown = sorted(str(k) for k in body if k not in FIELDS[kind])
    if unknown:
        raise BadRequest(f"Unrecognized request argument supplied: {unknown[0][:60]}")
    if kind == "edit":
        return _edit(body, vocab)
    if kind == "chat":
        if "messages" not in body:
            raise BadRequest("'messages' is required")
        prompt, raw = _messages(body["messages"]), False
    else:
        if "prompt" not in body:
            raise BadRequest("'prompt' is required")
        prompt, raw = _prompt(body["prompt"], vocab), True
    _refuse_unless(body, "model", lambda v: isinstance(v, str), "must be a string")
    _refuse_unless(body, "user", lambda v: isinstance(v, str), "must be a string")
    n = _int(body, "n", 1, MAX_N, 1)
    _refuse_unless(body, "best_of", lambda v: v == 1 or v == n, "must equal n")
    echo = _bool(body, "echo")
    if kind == "chat":
        lp = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", 0, 20)
        if top is not None and not lp:
            raise BadRequest("'top_logprobs' needs 'logprobs': true")
        logprobs = (top or 0) if lp else None
    else:
        logprobs = _int(body, "logprobs", 0, 5)
    _refuse_unless(body, "stream_options", lambda v: isinstance(v, dict) and set(v) <= {"include_usage"}
                   and isinstance(v.get("include_usage", False), bool), "must be {'include_usage': bool}")
    mode = body.get("mode", "auto")
    if mode not in MODES + ("auto",):
        raise BadRequest(f"'mode' must be one of auto, {', '.join(MODES)}, got {str(mode)[:40]!r}")
    auto = mode == "auto"
    mode = default_mode if auto else mode
    max_tokens = _int(body, "max_completion_tokens", 1, context) or _int(body, "max_tokens", 1, context, 256)
    kw = {"mode": mode, "max_new_tokens": max_tokens, **_sampling(body, vocab), **_controls(body, vocab)}
    if logprobs is not None:
        kw["logprobs"] = logprobs
    tools = body.get("tools")
    if tools is not None and kind == "chat":
        kw.update(tools=tools, tool_choice=body.get("tool_choice"),
                  parallel_tool_calls=_bool(body, "parallel_tool_calls", True))
    elif body.get("tool_choice") not in (None, "none", "auto"):
        raise BadRequest("'tool_choice' needs 'tools'")
    if auto and mode == "diffusion" and kw["steps"] is None:
        kw["steps"] = default_steps
    if kw["steps"] is not None and kw["block_size"] is not None and kw["steps"] > kw["block_size"]:
        raise BadRequest(f"'steps' must be at most 'block_size' ({kw['block_size']}), got {kw['steps']}")
    stream = _bool(body, "stream")
    include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
    kw = {k: v for k, v in kw.items() if v is not None}
    if n > 1 and kw.get("temperature", 0) > 0 and kw.get("seed") is None:
        import secrets

        kw["seed"] = secrets.randbits(62)  # choice i draws with seed + i: n different samples, reproducible
    extra = dict(n=n, echo=echo, logprobs=logprobs, tools=bool(tools))
    suffix = body.get("suffix")
    if suffix is None or suffix == "":
        return Request(prompt, raw, kw, stream, include_usage, **extra)
    # fill in the middle: the masks between prompt and suffix, at most max_tokens of them (<= the window)
    if not isinstance(suffix, str):
        raise BadRequest("'suffix' must be a string")
    if body.get("mode", "auto") not in ("diffusion", "auto"):
        raise BadRequest("a request with 'suffix' (fill in the middle) runs the diffusion mode only")
    fill = {k: v for k, v in kw.items() if k in FILL}
    if body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None:
        fill["max_length"] = min(kw["max_new_tokens"], kw.get("block_size", block))  # a fill is one window
    return Request(prompt, raw, fill, stream, include_usage, call="infill", suffix=suffix, n=n, echo=echo)
