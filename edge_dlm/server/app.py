"""A local OpenAI-compatible HTTP server (standard library only); `edge-dlm serve` is `edge_dlm.cli.serve`.
This module answers requests (one method per route); `transport` is the HTTP side (options, admission,
the threaded server), `openai_fields` and `ollama` the responses' shapes.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`, with
`"stream": true` as server-sent events; the request schema is `edge_dlm.server.schema` (strict: bad types,
ranges, modes and unknown fields are HTTP 400 with an OpenAI-style error object).

What it guarantees (the README's server section says the same):
- Binds 127.0.0.1 unless told otherwise, and says so loudly when bound elsewhere; `--api-key`
  (or EDGE_DLM_API_KEY) requires `Authorization: Bearer KEY` on every route (401 otherwise).
- Bodies above `--max-body` bytes are refused (413) before they are read (a chunked body as soon as
  it passes the limit); a body needs a Content-Length or chunked encoding (411); a connection that
  stalls while sending or receiving is dropped after `--io-timeout` seconds.
- Browser pages (CORS): this machine's own pages and local apps (`LOCAL_ORIGINS`) and the origins
  given with `--origins` may call it (preflights answered); any other web page gets 403.
- One request decodes at a time (the model is one), streams never interleave; up to `--queue`
  more wait, in arrival order. A request beyond that gets 429 at once; one that waited
  `--queue-timeout` seconds without starting gets 503. Both carry Retry-After.
- A request stops after the pass in flight when its client disconnects (the next one starts at
  once), and at `--request-timeout` seconds (finish_reason "timeout").
- No traceback reaches a client: an unexpected error is logged here and answered with a plain 500.
- SIGTERM / SIGINT: new requests get 503, the running one is cancelled after its current pass and
  its stream is closed properly (finish_reason "cancelled", then [DONE]), then the process exits 0.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import json
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler

from edge_dlm.server.openai_fields import finish, logprobs_json, tool_calls, usage
from edge_dlm.server.transport import (ROUTES, Admission, HTTPError, ServeOptions, Server, client_gone,
                                       is_loopback, origin_allowed, route_of)

__all__ = ["ServeOptions", "build_server", "is_loopback", "origin_allowed", "route_of"]

def make_handler(rt, opts: ServeOptions, admission: Admission, model_name: str):
    from edge_dlm.server import ollama
    from edge_dlm.server.schema import BadRequest, parse_request
    from edge_dlm.decoding import Done, Emit
    from edge_dlm.primitives.errors import UserError
    from edge_dlm.primitives.power import EnergyMeter, PowerSupply, Sampler
    from edge_dlm.runtime import Text

    ctx, vocab = rt.config.max_position_embeddings, rt.config.vocab_size
    meter, supply = EnergyMeter(str(rt.device)), PowerSupply()
    shapes_said = [""]  # the last compiled-shapes line the log got
    created = int(time.time())

    class Handler(BaseHTTPRequestHandler):
        server_version = "edge-dlm"
        timeout = opts.io_timeout  # socket timeout for every read and write of this connection

        def log_message(self, fmt, *args):  # one line per request on stderr
            print(f"{self.address_string()} {fmt % args}", file=sys.stderr)

        def send_json(self, code: int, obj: dict, headers: dict[str, str] | None = None) -> None:
            self.drain()
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def end_headers(self):
            """Every answer to an allowed browser page names its origin (CORS)."""
            origin = self.headers.get("Origin") if getattr(self, "headers", None) else None
            if origin and origin_allowed(origin, opts.origins):
                self.send_header("Access-Control-Allow-Origin", origin)
                self.send_header("Vary", "Origin")
            super().end_headers()

        def error(self, e: HTTPError) -> None:
            if getattr(self, "ollama_api", False) or self.path.startswith("/api/"):  # Ollama's error shape
                self.send_json(e.code, {"error": str(e)}, e.headers)
                return
            self.send_json(e.code, {"error": {"message": str(e), "type": e.kind, "code": e.code}}, e.headers)

        def send_error(self, code, message=None, explain=None):
            """The standard library's own error answers (a malformed request line, headers too long, an
            unknown method), as the same JSON error object every route answers with."""
            self.close_connection = True
            self.body_read = False  # a body sent with an unknown method is read before the answer
            if code == 501:  # no do_<METHOD>: a method this API does not have
                code, message, headers = 405, f"method {str(self.command)[:16]} not allowed; use GET or POST", \
                    {"Allow": "GET, POST, HEAD, OPTIONS"}
            else:
                headers = {}
            with contextlib.suppress(OSError):
                self.error(HTTPError(int(code), message or "bad request", headers=headers))

        def guarded(self, fn) -> None:
            """Run a route; errors become OpenAI-style answers, never a traceback to the client."""
            self.headers_sent, self.body_read, self.timed_out, self.ollama_api = False, False, None, False
            try:
                self.check_origin()
                self.authorize()
                fn()
            except HTTPError as e:
                if not self.headers_sent:
                    self.error(e)
            except UserError as exc:  # a request the runtime refused: the client's to fix, one log line
                print(f"{self.address_string()} refused: {exc}", file=sys.stderr)
                if not self.headers_sent:
                    self.error(HTTPError(400, str(exc)))
                self.close_connection = self.headers_sent
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                self.close_connection = True
            except Exception:  # a bug: the log gets the traceback, the client one line
                traceback.print_exc(file=sys.stderr)
                if not self.headers_sent:
                    with contextlib.suppress(OSError):
                        self.error(HTTPError(500, "internal error (see the server log)", "server_error"))
                self.close_connection = True

        def check_origin(self) -> None:
            origin = self.headers.get("Origin")
            if origin and not origin_allowed(origin, opts.origins):
                raise HTTPError(403, f"requests from the web page {origin[:80]} are not allowed; allow it with "
                                "`edge-dlm serve --origins ORIGIN` (or $EDGE_DLM_ORIGINS)", "permission_error")

        def authorize(self) -> None:
            if opts.api_key is None:
                return
            got = self.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {opts.api_key}".encode()):
                raise HTTPError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error",
                                {"WWW-Authenticate": "Bearer"})

        def do_GET(self):
            self.guarded(self.get)

        def do_HEAD(self):  # a GET's status and headers (Ollama's CLI checks a server with HEAD /)
            self.guarded(self.get)

        def do_POST(self):
            self.guarded(self.post)

        def do_OPTIONS(self):
            """A browser's CORS preflight: what an allowed page may send (no API key: browsers send none)."""
            self.headers_sent, self.body_read, self.ollama_api = False, False, False
            try:
                self.check_origin()
            except HTTPError as e:
                self.error(e)
                return
            self.drain()
            self.send_response(204)
            self.send_header("Access-Control-Allow-Methods", "GET, POST, HEAD, OPTIONS")
            asked = self.headers.get("Access-Control-Request-Headers")
            self.send_header("Access-Control-Allow-Headers", asked[:1000] if asked else "Authorization, Content-Type")
            self.send_header("Access-Control-Max-Age", "86400")
            self.send_header("Content-Length", "0")
            self.end_headers()

        # ---- routes: one method each (OpenAI's under /v1, Ollama's under /api)
        def get(self):
            path = route_of(self.path)
            if path.startswith("/v1/models/"):
                return self.model(path.removeprefix("/v1/models/"))
            route = {"/v1/models": self.models, "/api/tags": self.ollama_tags, "/api/ps": self.ollama_ps,
                     "/api/version": self.ollama_version, "": self.ollama_root}.get(path)
            if route is None:
                raise HTTPError(404, f"no route GET {self.path[:80]}; try /v1/models or /api/tags", "not_found_error")
            route()

        def model_entry(self) -> dict:
            return {"id": model_name, "object": "model", "owned_by": "edge-dlm", "created": created,
                    "context_length": ctx, "max_model_len": ctx}

        def models(self):
            self.send_json(200, {"object": "list", "data": [self.model_entry()]})

        def model(self, name: str):
            """`GET /v1/models/{id}` (OpenAI's retrieve): this server's one model, by its name."""
            from urllib.parse import unquote

            if unquote(name) != model_name:
                raise HTTPError(404, f"the model {unquote(name)[:80]!r} does not exist here; this server runs "
                                f"{model_name!r}", "not_found_error")
            self.send_json(200, self.model_entry())

        def ollama_root(self):
            self.send_json(200, {"status": "edge-dlm is running"})

        def ollama_tags(self):
            self.send_json(200, {"models": [ollama.model_entry(rt, model_name)]})

        def ollama_ps(self):
            self.send_json(200, {"models": [ollama.running_entry(rt, model_name)]})

        def ollama_version(self):
            self.send_json(200, {"version": ollama.VERSION})

        def ollama_show(self):
            body = self.read_body()
            name = body.get("model", body.get("name")) if isinstance(body, dict) else None
            if not isinstance(name, str):
                raise HTTPError(400, "'model' is required", "invalid_request_error")
            self.send_json(200, ollama.show(rt, model_name))

        def embeddings(self):
            self.read_body()
            raise HTTPError(501, f"{model_name} is a generative model, not an embedding model: edge-dlm serves no "
                            "embeddings (use an embedding model's own server)", "invalid_request_error")

        def body_length(self) -> int:
            """The request's Content-Length, checked (one header, ASCII digits, within --max-body)."""
            lengths = self.headers.get_all("Content-Length") or []
            if not lengths:
                raise HTTPError(411, "a Content-Length header (or a chunked body) is required")
            length = lengths[0].strip()
            if len(lengths) > 1:
                self.close_connection = True
                raise HTTPError(400, "the request has more than one Content-Length header")
            if not (length.isascii() and length.isdigit()) or len(length) > 18:
                self.close_connection = True
                raise HTTPError(400, "Content-Length must be a number of bytes (ASCII digits)")
            if int(length) > opts.max_body:
                self.close_connection = True
                raise HTTPError(413, f"the body is {length} bytes; the limit is {opts.max_body}")
            return int(length)

        def read_chunked(self) -> bytes:
            """A `Transfer-Encoding: chunked` body (what clients send when they stream a body of unknown
            length), held to --max-body; a malformed one is 400 and the connection is closed."""
            te = self.headers.get("Transfer-Encoding", "").strip().lower()
            self.close_connection = True  # until the body is read whole
            if te != "chunked" or self.headers.get("Content-Length"):
                raise HTTPError(400, "only 'Transfer-Encoding: chunked' is understood, and never with a Content-Length")
            parts, total = [], 0
            while True:
                line = self.rfile.readline(80)
                size = line.split(b";", 1)[0].strip()
                if not line.endswith(b"\n") or not size or len(size) > 16 or \
                        any(c not in b"0123456789abcdefABCDEF" for c in size):
                    raise HTTPError(400, "a malformed chunk in the chunked body")
                n = int(size, 16)
                total += n
                if total > opts.max_body:
                    raise HTTPError(413, f"the chunked body passed {opts.max_body} bytes, the limit")
                if n == 0:
                    for _ in range(64):  # trailer lines, up to the blank one
                        if self.rfile.readline(1024) in (b"\r\n", b"\n", b""):
                            break
                    else:
                        raise HTTPError(400, "too many trailer lines in the chunked body")
                    self.close_connection = False
                    return b"".join(parts)
                chunk = self.rfile.read(n)
                if len(chunk) != n or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                    raise HTTPError(400, "a chunk of the chunked body is shorter than its size")
                parts.append(chunk)

        def read_raw(self) -> bytes:
            self.body_read = True
            if self.headers.get("Transfer-Encoding"):
                return self.read_chunked()
            return self.rfile.read(self.body_length())

        def drain(self) -> None:
            """Read a body no route read before answering (a 404, a GET with a body): closing on unread
            bytes makes the kernel reset the connection, which can destroy the answer in flight."""
            if getattr(self, "body_read", True) or not getattr(self, "headers", None) \
                    or not (self.headers.get("Content-Length") or self.headers.get("Transfer-Encoding")):
                return
            try:
                self.read_raw()
            except (HTTPError, OSError):
                self.close_connection = True

        def read_body(self):
            raw = self.read_raw()
            try:
                return json.loads(raw.decode("utf-8"))
            except RecursionError:
                raise HTTPError(400, "the body is nested too deeply") from None
            except ValueError as exc:  # not UTF-8, not JSON, or an integer beyond Python's digit limit
                raise HTTPError(400, f"the body is not valid JSON ({str(exc)[:80]})") from None

        def post(self):
            path = route_of(self.path)
            routes = {"/v1/chat/completions": lambda: self.openai("chat"),
                      "/v1/completions": lambda: self.openai("completion"), "/v1/edits": lambda: self.openai("edit"),
                      "/api/chat": lambda: self.ollama("chat"), "/api/generate": lambda: self.ollama("generate"),
                      "/api/show": self.ollama_show, "/api/embed": self.embeddings,
                      "/api/embeddings": self.embeddings, "/v1/embeddings": self.embeddings}
            if path not in routes:
                raise HTTPError(404, f"no route POST {self.path[:80]}; try {', '.join(ROUTES)}, /api/chat, /api/generate",
                                "not_found_error")
            routes[path]()

        def openai(self, kind: str):
            body = self.read_body()
            try:
                req = parse_request(kind, body, default_mode=opts.default_mode, default_steps=opts.default_steps,
                                    context=ctx, vocab=vocab, block=rt.config.block_size)
            except BadRequest as exc:
                raise HTTPError(400, str(exc)) from None
            self.decode(req, lambda runs: self.respond(kind, req, runs))

        def ollama(self, kind: str):
            self.ollama_api = True
            body = self.read_body()
            try:
                req = ollama.parse(kind, body, default_mode=opts.default_mode, context=ctx, vocab=vocab)
            except BadRequest as exc:
                raise HTTPError(400, str(exc)) from None
            if req is not None and req.ignored:
                print(f"{self.address_string()} ignored what this Ollama API does not know: "
                      f"{', '.join(req.ignored[:8])}", file=sys.stderr)
            if req is None:  # an empty prompt: Ollama's "load the model" call
                self.send_json(200, ollama.loaded(model_name, kind))
                return
            self.decode(req, lambda runs: ollama.respond(self, kind, req, runs, model_name))

        def decode(self, req, answer):
            """Take the model's turn, then `answer(runs)`: `runs()` yields, per choice (n of them), that
            choice's events (validation errors surface before any header is sent)."""
            cancel, timed_out = threading.Event(), threading.Event()
            self.timed_out = timed_out
            with admission.turn(cancel):
                timer = threading.Timer(opts.request_timeout, lambda: (timed_out.set(), cancel.set()))
                timer.daemon = True
                timer.start()
                self.sampler, self.reading = Sampler(str(rt.device), meter, supply), None
                self.sampler.start()  # one request decodes at a time, so its energy is its own
                try:
                    first_events = self.events(req, 0, cancel)

                    def runs():
                        yield first_events
                        for i in range(1, req.n):
                            if cancel.is_set():
                                return
                            yield self.events(req, i, cancel)
                    answer(runs)
                finally:
                    timer.cancel()
                    self.log_shapes()

        def events(self, req, i: int, cancel):
            """Choice `i`'s events, its first one already taken (a refused request fails here, as 400)."""
            kw = dict(req.kwargs)
            if i and "seed" in kw:
                kw["seed"] = (kw["seed"] + i) % (1 << 63)
            if req.call == "infill":
                events = rt.infill_stream(req.prompt, req.suffix, cancel=cancel, **kw)
            elif req.call == "edit":
                events = rt.edit_stream(req.prompt, req.spans, cancel=cancel, **kw)
            else:
                events = rt.stream(req.prompt, raw=req.raw, cancel=cancel, **kw)
            try:
                first = next(events)
            except UserError as exc:
                raise HTTPError(400, str(exc)) from None
            return self.watched(first, events, cancel)

        def log_shapes(self) -> None:
            """One line when the compiled pass shapes changed (`StepFunctions.summary`)."""
            summary = getattr(getattr(rt.model, "step", None), "summary", None)
            if summary is not None and (line := summary()) != shapes_said[0]:
                shapes_said[0] = line
                print(f"compiled passes: {line}", file=sys.stderr)

        def watched(self, first, events, cancel):
            """The request's events; a client that left cancels it (the runtime stops after this pass).
            The energy reading is taken when the request is done."""
            for i, ev in enumerate(itertools.chain([first] if first is not None else [], events)):
                if i and not cancel.is_set() and client_gone(self.connection):
                    cancel.set()
                if isinstance(ev, Done):
                    self.reading = self.sampler.stop()
                yield ev

        def respond(self, kind, req, runs):
            chat = kind == "chat"
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            obj = {"chat": "chat.completion", "completion": "text_completion", "edit": "edit"}[kind]
            if req.stream:
                return self.stream(rid, obj, chat, req, runs)
            choices, results = [], []
            for i, events in enumerate(runs()):
                text, result = ollama.collect(events)
                results.append(result)
                choices.append(self.choice(i, chat, req, text, result))
            if self.cancelled_by_client():
                return
            self.send_json(200, {"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                                 "choices": choices, "usage": usage(results, self.reading)})

        def cancelled_by_client(self) -> bool:
            gone = self.timed_out is not None and not self.timed_out.is_set() and client_gone(self.connection)
            if gone:
                self.close_connection = True
            return gone

        def choice(self, i, chat, req, text, result) -> dict:
            """One choice of a non-streamed answer, OpenAI's shape."""
            out = {"index": i, "finish_reason": finish(result, self.timed_out)}
            if req.echo and not chat and isinstance(req.prompt, str):
                text = req.prompt + text
            if chat:
                msg = {"role": "assistant", "content": text}
                if result is not None and result.tool_calls:
                    msg = {"role": "assistant", "content": result.text or None, "tool_calls": tool_calls(result)}
                out["message"] = msg
            else:
                out["text"] = text
            if req.logprobs is not None:
                out["logprobs"] = logprobs_json(rt.tokenizer, (result.logprobs if result else None) or [], chat)
            return out

        def stream(self, rid, obj, chat, req, runs):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.headers_sent = True
            kind = obj + ".chunk" if chat else obj

            def send(choices: list, extra: dict | None = None) -> None:
                chunk = {"id": rid, "object": kind, "created": int(time.time()), "model": model_name,
                         "choices": choices, **(extra or {})}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            results, events = [], iter(())
            try:
                for i, events in enumerate(runs()):
                    if chat:  # OpenAI's first chunk names the role, with no content yet
                        send([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                    if req.echo and not chat and isinstance(req.prompt, str):
                        send([{"index": i, "text": req.prompt, "finish_reason": None}])
                    held, pending = [], []  # tool answers are sent whole; logprobs ride with their text
                    for ev in events:
                        if isinstance(ev, Emit) and ev.logprobs:
                            pending += ev.logprobs
                        elif isinstance(ev, Text) and req.tools:
                            held.append(ev.delta)
                        elif isinstance(ev, Text):
                            piece = {"delta": {"content": ev.delta}} if chat else {"text": ev.delta}
                            if req.logprobs is not None:
                                piece["logprobs"] = logprobs_json(rt.tokenizer, pending, chat)
                                pending = []
                            send([{"index": i, **piece, "finish_reason": None}])
                        elif isinstance(ev, Done):
                            r = ev.result
                            results.append(r)
                            if r.tool_calls:
                                calls = [{"index": j, **c} for j, c in enumerate(tool_calls(r))]
                                send([{"index": i, "delta": {"content": r.text or None, "tool_calls": calls},
                                       "finish_reason": None}])
                            elif held:
                                send([{"index": i, "delta": {"content": "".join(held)}, "finish_reason": None}])
                            end = {"delta": {}} if chat else {"text": ""}
                            last = i == req.n - 1 or self.cancelled_by_client()
                            send([{"index": i, **end, "finish_reason": finish(r, self.timed_out)}],
                                 {"usage": usage(results, self.reading)} if last and not req.include_usage else None)
                if req.include_usage:
                    send([], {"usage": usage(results, self.reading)})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
                self.cancel_events(events)

        def cancel_events(self, events) -> None:
            """The client left or stalled: stop decoding after this pass and release the model."""
            if admission.active_cancel is not None:
                admission.active_cancel.set()
            with contextlib.suppress(Exception):
                for _ in events:
                    pass
            self.close_connection = True

    return Handler


def build_server(rt, host: str, port: int, opts: ServeOptions | None = None) -> Server:
    opts = opts or ServeOptions()
    admission = Admission(opts.queue, opts.queue_timeout)
    return Server((host, port), make_handler(rt, opts, admission, rt.name), admission)
