"""`edge-dlm serve`: a local OpenAI-compatible HTTP server (standard library only).

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`, with
`"stream": true` as server-sent events. Besides the OpenAI fields (`messages` / `prompt`,
`max_tokens`, `temperature`, `top_p`, `seed`, `stop` is not supported), a request may name the
decoding `mode`, `steps`, `threshold` and `block_size`; the response's `usage` carries `nfe`, `tpf`
and `mean_accepted` next to the token counts. One model, one request at a time (the `Runtime` lock);
binds 127.0.0.1 unless told otherwise. Bad requests get HTTP 400 with an OpenAI-style error object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EXTRA = ("mode", "steps", "threshold", "block_size", "top_k")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edge_dlm.cli import add_model_args

    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--mode", default="linear-spec", help="default decoding mode for requests that name none")


class BadRequest(Exception):
    pass


def request_kwargs(body: dict, default_mode: str) -> dict:
    """Decoding keyword arguments from an OpenAI-style request body."""
    kw = {"mode": body.get("mode", default_mode), "max_new_tokens": body.get("max_tokens", 256),
          "temperature": body.get("temperature", 0.0), "top_p": body.get("top_p", 1.0), "seed": body.get("seed")}
    for key in EXTRA[1:]:
        if key in body:
            kw[key] = body[key]
    if body.get("stop"):
        raise BadRequest("'stop' is not supported; the model stops at its end-of-sequence token")
    if body.get("n", 1) != 1:
        raise BadRequest("only n = 1 is supported")
    return kw


def make_handler(rt, default_mode: str, model_name: str):
    from edge_dlm.decoding import Done
    from edge_dlm.errors import UserError
    from edge_dlm.runtime import Text

    class Handler(BaseHTTPRequestHandler):
        server_version = "edge-dlm"

        def log_message(self, fmt, *args):  # one line per request on stderr
            print(f"{self.address_string()} {fmt % args}", file=sys.stderr)

        def send_json(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def error(self, code: int, message: str) -> None:
            self.send_json(code, {"error": {"message": message, "type": "invalid_request_error"}})

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self.send_json(200, {"object": "list", "data": [
                    {"id": model_name, "object": "model", "owned_by": "edge-dlm", "created": 0}]})
            else:
                self.error(404, f"no route {self.path}; try /v1/models, /v1/chat/completions, /v1/completions")

        def do_POST(self):
            chat = self.path.rstrip("/") == "/v1/chat/completions"
            if not chat and self.path.rstrip("/") != "/v1/completions":
                return self.error(404, f"no route {self.path}")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not isinstance(body, dict):
                    raise BadRequest("the body must be a JSON object")
                prompt = body.get("messages") if chat else body.get("prompt")
                if not prompt:
                    raise BadRequest("'messages' is required" if chat else "'prompt' is required")
                kw = request_kwargs(body, default_mode)
                events = rt.stream(prompt, raw=not chat, **kw)
                first = next(events)  # validation errors surface here, before any header is sent
            except (BadRequest, UserError, json.JSONDecodeError, TypeError, ValueError) as exc:
                return self.error(400, str(exc))
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            obj = "chat.completion" if chat else "text_completion"
            if body.get("stream"):
                return self.stream(rid, obj, chat, first, events)
            text, result = [], None
            for ev in [first, *events]:
                if isinstance(ev, Text):
                    text.append(ev.delta)
                elif isinstance(ev, Done):
                    result = ev.result
            choice = {"index": 0, "finish_reason": finish(result)}
            if chat:
                choice["message"] = {"role": "assistant", "content": "".join(text)}
            else:
                choice["text"] = "".join(text)
            self.send_json(200, {"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                                 "choices": [choice], "usage": usage(result)})

        def stream(self, rid, obj, chat, first, events):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            kind = obj + ".chunk" if chat else obj

            def send(choice: dict, extra: dict | None = None) -> None:
                chunk = {"id": rid, "object": kind, "created": int(time.time()), "model": model_name,
                         "choices": [choice], **(extra or {})}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            try:
                for ev in [first, *events]:
                    if isinstance(ev, Text):
                        piece = {"delta": {"content": ev.delta}} if chat else {"text": ev.delta}
                        send({"index": 0, **piece, "finish_reason": None})
                    elif isinstance(ev, Done):
                        end = {"delta": {}} if chat else {"text": ""}
                        send({"index": 0, **end, "finish_reason": finish(ev.result)}, {"usage": usage(ev.result)})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                events.close()  # the client left: stop decoding

    return Handler


def finish(result) -> str:
    return result.finish_reason if result else "error"


def usage(result) -> dict:
    if result is None:
        return {}
    out = {"prompt_tokens": len(result.prompt_ids), "completion_tokens": len(result.output_ids),
           "total_tokens": len(result.prompt_ids) + len(result.output_ids), "nfe": result.nfe,
           "tpf": round(result.tpf, 3), "tokens_per_s": round(result.tokens_per_s, 1)}
    if result.mean_accepted is not None:
        out["mean_accepted"] = round(result.mean_accepted, 3)
    return out


def build_server(rt, host: str, port: int, default_mode: str = "linear-spec") -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), make_handler(rt, default_mode, rt.path.name))


def run(a: argparse.Namespace) -> int:
    from edge_dlm.cli import load_runtime
    from edge_dlm.decoding import MODES
    from edge_dlm.errors import UserError

    if a.mode not in MODES:
        raise UserError(f"--mode {a.mode} not supported; known: {', '.join(MODES)}")
    rt = load_runtime(a)
    try:
        server = build_server(rt, a.host, a.port, a.mode)
    except OSError as exc:
        raise UserError(f"cannot listen on {a.host}:{a.port} ({exc.strerror}); pick another --port") from None
    print(f"edge-dlm serve: {rt.path.name} ({rt.device}, {rt.precision}) on http://{a.host}:{server.server_port}/v1",
          file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
