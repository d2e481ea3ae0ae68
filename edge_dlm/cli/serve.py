"""`edge-dlm serve`: the flags, the model loaded (`--mode auto` resolved), then `edge_dlm.server.app` serves it."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from edge_dlm.server.app import ServeOptions, build_server, is_loopback


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edge_dlm.cli.args import add_auto_args, add_model_args

    add_model_args(p)
    d = ServeOptions()
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--mode", default="auto", help="decoding mode for requests that name none or 'auto' (default: "
                   "auto, the fastest lossless mode measured on this machine)")
    add_auto_args(p)
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key-file", metavar="FILE",
                     help="require 'Authorization: Bearer KEY' with KEY read from FILE (kept out of `ps`)")
    key.add_argument("--api-key", default=os.environ.get("EDGE_DLM_API_KEY"),
                     help="the same with KEY on the command line, visible to other users in `ps`; prefer "
                     "--api-key-file or $EDGE_DLM_API_KEY (the default)")
    p.add_argument("--max-body", type=int, default=d.max_body, help=f"largest request body in bytes ({d.max_body})")
    p.add_argument("--queue", type=int, default=d.queue, help=f"requests that may wait for the model ({d.queue})")
    p.add_argument("--queue-timeout", type=float, default=d.queue_timeout,
                   help=f"seconds a request may wait before 503 ({d.queue_timeout:g})")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help=f"seconds a request may decode ({d.request_timeout:g})")
    p.add_argument("--io-timeout", type=float, default=d.io_timeout,
                   help=f"seconds a client may stall reading or writing ({d.io_timeout:g})")
    p.add_argument("--origins", default=os.environ.get("EDGE_DLM_ORIGINS", ""), metavar="LIST",
                   help="web pages (browser origins, comma-separated, '*' wildcards) allowed to call the server "
                   "beside this machine's own pages and local apps (default $EDGE_DLM_ORIGINS); '*' allows any")


def run(a: argparse.Namespace) -> int:
    from edge_dlm.decoding import MODES
    from edge_dlm.primitives.errors import UserError
    from edge_dlm.session.load import load_auto, load_runtime, say

    if a.mode not in MODES + ("auto",):
        raise UserError(f"--mode {a.mode} not supported; known: auto, {', '.join(MODES)}")
    for flag in ("max_body", "queue"):
        if getattr(a, flag) < (1 if flag == "max_body" else 0):
            raise UserError(f"--{flag.replace('_', '-')} must be positive")
    for flag in ("queue_timeout", "request_timeout", "io_timeout"):
        if not getattr(a, flag) > 0:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive number of seconds")
    if a.api_key_file is not None:
        from edge_dlm.primitives.inputs import read_text

        a.api_key = read_text(a.api_key_file, "--api-key-file", limit=4096).strip()
        if not a.api_key or any(c.isspace() for c in a.api_key):
            raise UserError(f"--api-key-file {a.api_key_file} must hold one key (no spaces)")
    if a.api_key is not None and not a.api_key.strip():
        raise UserError("--api-key is empty")
    mode, steps = a.mode, None
    if mode == "auto":
        auto = load_auto(a)
        rt, mode, steps = auto.runtime, auto.row.mode, auto.row.steps
        say(f"edge-dlm serve: {auto.reason}")
    else:
        rt = load_runtime(a, mode)
    opts = ServeOptions(default_mode=mode, default_steps=steps, api_key=a.api_key, max_body=a.max_body, queue=a.queue,
                        queue_timeout=a.queue_timeout, request_timeout=a.request_timeout, io_timeout=a.io_timeout,
                        origins=tuple(o.strip() for o in a.origins.split(",") if o.strip()))
    try:
        server = build_server(rt, a.host, a.port, opts)
    except (OSError, OverflowError) as exc:
        raise UserError(f"cannot listen on {a.host}:{a.port} ({getattr(exc, 'strerror', None) or exc}); "
                        "pick another --port") from None
    if not is_loopback(a.host):
        print(f"edge-dlm serve: WARNING: listening on {a.host}, not 127.0.0.1: anyone who can reach this machine "
              f"can use the model{'' if a.api_key else ' (no --api-key set)'}", file=sys.stderr)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    print(f"edge-dlm serve: {rt.name} ({rt.device}, {rt.precision}) on http://{a.host}:{server.server_port}/v1"
          f"{' (API key required)' if a.api_key else ''}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.admission.close()
        server.drain(opts.io_timeout)  # the cancelled request closes its stream; late clients get 503
        server.server_close()
    print("edge-dlm serve: stopped", file=sys.stderr)
    return 0
