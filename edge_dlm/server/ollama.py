"""The Ollama API on the same server: `/api/chat`, `/api/generate` (with `suffix`: infill by
denoising), `/api/tags`, `/api/show`, `/api/ps`, `/api/version`, NDJSON streams, Ollama's error
shape (`{"error": "..."}`).

The requests map onto the core's options exactly as the OpenAI schema does (`schema.py`): `options`
(temperature, top_k, top_p, num_predict, stop, repeat_penalty, repeat_last_n, presence_penalty,
frequency_penalty, seed, num_ctx, min_tokens; edge-dlm's mode, steps, threshold, block_size) and
`format` ("json" or a JSON schema). Options Ollama knows and edge-dlm does not use (num_gpu, num_thread,
mirostat, ...) are accepted and ignored, as Ollama ignores what a runner lacks; so are options and
fields this API version does not know (Ollama itself logs "invalid option provided" and goes on: a
client newer than the server still works), each named in the server log; `keep_alive` is accepted (the
model stays loaded for the server's life).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from typing import Any

from edge_dlm.decoding import MODES
from edge_dlm.server.schema import BadRequest, Request, _messages, response_format

VERSION = "0.6.3"  # the Ollama API version whose shapes these are
OPTIONS = {"temperature", "top_k", "top_p", "num_predict", "stop", "repeat_penalty", "repeat_last_n", "seed",
           "num_ctx", "presence_penalty", "frequency_penalty", "min_tokens", "mode", "steps", "threshold",
           "block_size"}
IGNORED = {"num_keep", "typical_p", "min_p", "mirostat", "mirostat_tau", "mirostat_eta", "penalize_newline",
           "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "vocab_only", "use_mmap", "use_mlock",
           "num_thread", "tfs_z"}
CHAT = {"model", "messages", "tools", "format", "options", "stream", "keep_alive", "think"}
GENERATE = {"model", "prompt", "suffix", "system", "template", "context", "stream", "raw", "format", "options",
            "keep_alive", "images", "think"}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _options(o: Any, context: int, vocab: int) -> dict[str, Any]:
    if o is None:
        return {}
    if not isinstance(o, dict):
        raise BadRequest("'options' must be an object")
    from edge_dlm.server.schema import _controls, _int, _sampling

    body = {k: v for k, v in o.items() if k in OPTIONS}
    kw = {**_sampling({k: body.get(k) for k in ("temperature", "top_p", "top_k", "seed", "block_size", "steps",
                                                   "threshold")}, vocab),
          **_controls({k: body.get(k) for k in ("stop", "repeat_penalty", "repeat_last_n", "presence_penalty",
                                                  "frequency_penalty", "min_tokens")}, vocab)}
    if kw.get("temperature") is None:
        kw.pop("temperature", None)
    n = _int(body, "num_predict", -2, 1 << 30)
    if n is not None:
        kw["max_new_tokens"] = context if n < 0 else max(n, 1)
    _int(body, "num_ctx", 1, 1 << 30)  # accepted: the model's context is its own
    mode = body.get("mode")
    if mode is not None:
        if mode not in MODES:
            raise BadRequest(f"option 'mode' must be one of {', '.join(MODES)}, got {str(mode)[:40]!r}")
        kw["mode"] = mode
    return {k: v for k, v in kw.items() if v is not None}


def _format(f: Any) -> dict[str, Any]:
    if f is None or f == "":
        return {}
    if f == "json":
        return {"json": True}
    if isinstance(f, dict):
        return response_format({"type": "json_schema", "json_schema": {"name": "format", "schema": f}})
    raise BadRequest("'format' must be \"json\" or a JSON schema object")


def _chat_messages(v: Any) -> list[dict]:
    """Ollama's messages (tool calls' arguments as objects) in the OpenAI shape the core takes."""
    if not isinstance(v, list) or not v:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
    out, n = [], 0
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content'")
        m = {k: x for k, x in m.items() if k not in ("images", "thinking", "tool_name")}
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            conv = []
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict):
                    raise BadRequest(f"messages[{i}].tool_calls must be [{{function: {{name, arguments}}}}]")
                conv.append({"id": f"call_{n}", "type": "function",
                             "function": {"name": fn.get("name"), "arguments": json.dumps(fn.get("arguments", {}))}})
                n += 1
            m["tool_calls"] = conv
        if m.get("role") == "tool" and "tool_call_id" not in m:
            m["tool_call_id"] = f"call_{n - 1}" if n else ""
        m.setdefault("content", "")
        out.append(m)
    return _messages(out)


def parse(kind: str, body: Any, *, default_mode: str, context: int, vocab: int) -> Request | None:
    """An Ollama `/api/chat` or `/api/generate` body -> a `Request` (None: an empty prompt, which Ollama
    answers by loading the model)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    known = CHAT if kind == "chat" else GENERATE
    options = body.get("options")
    ignored = tuple(sorted(str(k)[:40] for k in body if k not in known)) + tuple(
        sorted(f"options.{str(k)[:40]}" for k in (options if isinstance(options, dict) else {})
               if k not in OPTIONS | IGNORED))
    body = {k: v for k, v in body.items() if k in known}
    if not isinstance(body.get("model"), str):
        raise BadRequest("model is required")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false")
    kw = {"mode": default_mode, "max_new_tokens": min(256, context), **_options(body.get("options"), context, vocab),
          **_format(body.get("format"))}
    if kind == "chat":
        if not body.get("messages"):
            return None
        prompt, raw = _chat_messages(body["messages"]), False
        if body.get("tools"):
            if kw.get("json") or kw.get("json_schema"):
                raise BadRequest("'tools' and 'format' cannot be combined; drop one")
            kw["tools"] = body["tools"]
        return Request(prompt, raw, kw, stream, False, tools=bool(body.get("tools")), ignored=ignored)
    prompt = body.get("prompt")
    if prompt is None or prompt == "":
        return None
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string")
    suffix = body.get("suffix")
    if suffix:  # fill in the middle: our infill, by denoising (diffusion)
        if not isinstance(suffix, str):
            raise BadRequest("'suffix' must be a string")
        fill = {k: v for k, v in kw.items() if k in ("steps", "threshold", "block_size", "temperature", "top_k",
                                                      "top_p", "seed")}
        return Request(prompt, True, fill, stream, False, call="infill", suffix=suffix, ignored=ignored)
    system = body.get("system")
    if body.get("raw") is True:
        return Request(prompt, True, kw, stream, False, ignored=ignored)
    msgs = ([{"role": "system", "content": system}] if isinstance(system, str) and system else []) + \
        [{"role": "user", "content": prompt}]
    return Request(msgs, False, kw, stream, False, ignored=ignored)


def respond(handler, kind: str, req: Request, runs, model_name: str) -> None:
    """Answer in Ollama's shapes: NDJSON lines when streamed, else one object."""
    from edge_dlm.decoding import Done
    from edge_dlm.runtime import Text

    key = "message" if kind == "chat" else "response"
    start = time.perf_counter_ns()

    def piece(text: str) -> Any:
        return {"role": "assistant", "content": text} if kind == "chat" else text

    def final(result, text: str) -> dict:
        out = {"model": model_name, "created_at": _now(), key: piece(text), "done": True,
               "done_reason": "stop" if result is None or result.finish_reason in ("stop", "tool_calls")
               else result.finish_reason, "total_duration": time.perf_counter_ns() - start, "load_duration": 0}
        if result is not None:
            ttft = int((result.ttft_s or 0) * 1e9)
            out.update(prompt_eval_count=len(result.prompt_ids), prompt_eval_duration=ttft,
                       eval_count=len(result.output_ids), eval_duration=max(int(result.elapsed_s * 1e9) - ttft, 1))
            if kind == "chat" and result.tool_calls:
                out["message"] = {"role": "assistant", "content": result.text or "", "tool_calls": [
                    {"function": {"name": c["name"], "arguments": json.loads(c["arguments"])}} for c in result.tool_calls]}
            if kind == "generate":
                out["context"] = result.prompt_ids + result.output_ids
        return out

    events = next(iter(runs()))
    if not req.stream:
        text, result = collect(events)
        if handler.cancelled_by_client():
            return
        handler.send_json(200, final(result, text if not (result and result.tool_calls) else ""))
        return
    handler.send_response(200)
    handler.send_header("Content-Type", "application/x-ndjson")
    handler.end_headers()
    handler.headers_sent = True
    try:
        for ev in events:
            if isinstance(ev, Text) and not req.tools:
                line = {"model": model_name, "created_at": _now(), key: piece(ev.delta), "done": False}
            elif isinstance(ev, Done):
                r = ev.result
                if req.tools and not r.tool_calls and r.text:
                    handler.wfile.write((json.dumps({"model": model_name, "created_at": _now(), key: piece(r.text),
                                                     "done": False}) + "\n").encode())
                line = final(r, "")
            else:
                continue
            handler.wfile.write((json.dumps(line) + "\n").encode())
            handler.wfile.flush()
    except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
        handler.cancel_events(events)


def collect(events) -> tuple[str, object]:
    """A non-streamed answer: its text and its `Result` (None if the events ended without one)."""
    from edge_dlm.decoding import Done
    from edge_dlm.runtime import Text

    text, result = [], None
    for ev in events:
        if isinstance(ev, Text):
            text.append(ev.delta)
        elif isinstance(ev, Done):
            result = ev.result
    return "".join(text), result


def loaded(model_name: str, kind: str) -> dict:
    key = "message" if kind == "chat" else "response"
    return {"model": model_name, "created_at": _now(), key: {"role": "assistant", "content": ""} if kind == "chat"
            else "", "done": True, "done_reason": "load"}


def _details(rt) -> dict:
    n = sum(p.numel() for p in rt.model.parameters()) if hasattr(rt.model, "parameters") else 0
    size = f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"
    return {"parent_model": "", "format": "safetensors", "family": "nemotron-labs-diffusion",
            "families": ["nemotron-labs-diffusion"], "parameter_size": size,
            "quantization_level": (rt.quant_scheme or str(rt.dtype).removeprefix("torch.")).upper()}


def _size_digest(rt) -> tuple[int, str]:
    files = sorted(rt.path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    h = hashlib.sha256(json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]).encode())
    return size, h.hexdigest()


def model_entry(rt, name: str) -> dict:
    size, digest = _size_digest(rt)
    return {"name": name, "model": name, "modified_at": _now(), "size": size, "digest": digest,
            "details": _details(rt)}


def running_entry(rt, name: str) -> dict:
    entry = model_entry(rt, name)
    entry.update(expires_at="2999-01-01T00:00:00Z", size_vram=entry["size"] if rt.device.type == "cuda" else 0,
                 context_length=rt.config.max_position_embeddings)
    return entry


def show(rt, name: str) -> dict:
    c = rt.config
    return {"modelfile": f"# edge-dlm serves {name}\nFROM {rt.path}\n", "parameters": "",
            "template": rt.tokenizer.chat_template if isinstance(rt.tokenizer.chat_template, str) else "",
            "details": _details(rt), "modified_at": _now(),
            "model_info": {"general.architecture": "nemotron-labs-diffusion", "general.basename": name,
                           "nld.context_length": c.max_position_embeddings, "nld.block_size": c.block_size,
                           "nld.mask_token_id": c.mask_token_id, "nld.vocab_size": c.vocab_size,
                           "nld.block_count": c.num_hidden_layers, "nld.embedding_length": c.hidden_size},
            "capabilities": ["completion", "tools", "insert"]}
