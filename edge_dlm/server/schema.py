"""The OpenAI-compatible request schema of `edge-dlm serve`, validated strictly.

`parse_request(kind, body, ...)` turns a JSON body into a `Request` (prompt + decoding keyword
arguments) or raises `BadRequest` with one line naming the field. Every field is type- and
range-checked; a field OpenAI defines but edge-dlm cannot honour (n > 1, stop sequences, logprobs,
penalties) is refused rather than silently ignored, and, as OpenAI does, an unknown field is refused
("Unrecognized request argument supplied"). edge-dlm's own fields: `mode`, `steps`, `threshold`,
`block_size`, `top_k`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from edge_dlm.decoding import MODES

ROLES = ("system", "user", "assistant")
COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stream",
          "stream_options", "n", "stop", "user", "presence_penalty", "frequency_penalty", "logprobs",
          "top_logprobs", "logit_bias", "response_format", "mode", "steps", "threshold", "block_size"}
FILL = {"model", "user", "temperature", "top_p", "top_k", "seed", "steps", "threshold", "block_size"}
FIELDS = {"chat": COMMON | {"messages"}, "completion": COMMON | {"prompt", "echo", "best_of", "suffix"},
          "edit": FILL | {"input", "spans", "stream"}}


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


def _messages(v: Any) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content'")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise BadRequest(f"messages[{i}] has unsupported fields: {', '.join(sorted(map(str, extra)))}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {str(role)[:40]!r}")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"messages[{i}].content parts must all be {{'type': 'text', 'text': str}}")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in out):
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
    _refuse_unless(body, "n", lambda v: v == 1, "must be 1: one completion per request")
    _refuse_unless(body, "best_of", lambda v: v == 1, "must be 1")
    _refuse_unless(body, "stop", lambda v: v == [] or v == "", "is not supported: the model stops at its "
                   "end-of-sequence token (cut the text yourself)")
    for key in ("presence_penalty", "frequency_penalty"):
        _refuse_unless(body, key, lambda v: v == 0, "is not supported (only 0)")
    _refuse_unless(body, "logprobs", lambda v: v is False or v == 0, "is not supported")
    _refuse_unless(body, "top_logprobs", lambda v: v == 0, "is not supported")
    _refuse_unless(body, "echo", lambda v: v is False, "is not supported")
    _refuse_unless(body, "logit_bias", lambda v: v == {}, "is not supported")
    _refuse_unless(body, "response_format", lambda v: v == {"type": "text"}, "supports only {'type': 'text'}")
    _refuse_unless(body, "stream_options", lambda v: isinstance(v, dict) and set(v) <= {"include_usage"}
                   and isinstance(v.get("include_usage", False), bool), "must be {'include_usage': bool}")
    mode = body.get("mode", "auto")
    if mode not in MODES + ("auto",):
        raise BadRequest(f"'mode' must be one of auto, {', '.join(MODES)}, got {str(mode)[:40]!r}")
    auto = mode == "auto"
    mode = default_mode if auto else mode
    max_tokens = _int(body, "max_completion_tokens", 1, context) or _int(body, "max_tokens", 1, context, 256)
    kw = {"mode": mode, "max_new_tokens": max_tokens, **_sampling(body, vocab)}
    if auto and mode == "diffusion" and kw["steps"] is None:
        kw["steps"] = default_steps
    if kw["steps"] is not None and kw["block_size"] is not None and kw["steps"] > kw["block_size"]:
        raise BadRequest(f"'steps' must be at most 'block_size' ({kw['block_size']}), got {kw['steps']}")
    stream = _bool(body, "stream")
    include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
    kw = {k: v for k, v in kw.items() if v is not None}
    suffix = body.get("suffix")
    if suffix is None or suffix == "":
        return Request(prompt, raw, kw, stream, include_usage)
    # fill in the middle: the masks between prompt and suffix, at most max_tokens of them (<= the window)
    if not isinstance(suffix, str):
        raise BadRequest("'suffix' must be a string")
    if body.get("mode", "auto") not in ("diffusion", "auto"):
        raise BadRequest("a request with 'suffix' (fill in the middle) runs the diffusion mode only")
    fill = {k: v for k, v in kw.items() if k in FILL}
    if body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None:
        fill["max_length"] = min(kw["max_new_tokens"], kw.get("block_size", block))  # a fill is one window
    return Request(prompt, raw, fill, stream, include_usage, call="infill", suffix=suffix)
