"""`edge-dlm chat`: the Textual app when it is installed and stdin is a terminal, else a plain REPL.

Plain REPL commands: /mode NAME, /steps N, /temp T, /new, /help, /quit. Ctrl-C stops an answer.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import threading


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edge_dlm.cli.args import add_decode_args, add_model_args

    add_model_args(p)
    add_decode_args(p, default_max=200)
    p.add_argument("--plain", action="store_true", help="line-based chat, no full-screen UI")


def run(a: argparse.Namespace) -> int:
    if not a.plain and sys.stdin.isatty() and sys.stdout.isatty():
        try:
            from edge_dlm.tui.app import run_app
        except ImportError:
            print("(the full-screen UI needs the 'tui' extra; using the plain chat)", file=sys.stderr)
        else:
            from edge_dlm.cli.args import CONTROLS, decode_kwargs

            return run_app(a, {k: v for k, v in decode_kwargs(a).items() if k in CONTROLS})
    return plain_chat(a)


class Saved:
    """The plain chat's conversations, in the same store the chat screen lists (Ctrl+O there)."""

    def __init__(self) -> None:
        self.store, self.conversation = None, None
        try:
            from edge_dlm.tui.store import Store

            self.store = Store()
        except (ImportError, OSError, sqlite3.Error) as exc:
            print(f"(this chat is not saved: {exc})", file=sys.stderr)

    def add(self, pair: list[dict[str, str]]) -> None:
        if self.store is None:
            return
        try:
            if self.conversation is None:
                self.conversation = self.store.new_conversation(pair[0]["content"][:60])
            for m in pair:
                self.store.add_message(self.conversation, m["role"], m["content"])
        except (OSError, sqlite3.Error) as exc:
            print(f"(saving stopped: {exc})", file=sys.stderr)
            self.store = None


SETTINGS = {"mode": ("mode", str), "steps": ("steps", int), "temp": ("temperature", float)}  # /cmd: (option, parse)


def plain_chat(a: argparse.Namespace) -> int:
    from edge_dlm.session.load import before_exit

    try:
        return _plain_chat(a)
    finally:
        before_exit(getattr(a, "_auto", None))


def _plain_chat(a: argparse.Namespace) -> int:
    from edge_dlm.cli.args import runtime_and_options
    from edge_dlm.decoding import MODES, Done
    from edge_dlm.primitives.errors import UserError
    from edge_dlm.runtime import Text

    rt, kw, auto = runtime_and_options(a, measure="background")
    a._auto = auto
    measuring = auto.measuring if auto is not None else None
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes reach the tokenizer's one-line refusal
        sys.stdin.reconfigure(errors="surrogateescape")
    messages: list[dict[str, str]] = []
    saved = Saved()
    print(f"edge-dlm chat: {rt.name} on {rt.device} ({rt.precision}), "
          f"mode {kw['mode']}. /help for commands, /quit to leave.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if measuring is not None and measuring.done():  # the background calibration finished: adopt it
            try:
                done = measuring.result()
            except Exception as exc:  # noqa: BLE001 (the chat goes on with what it runs)
                print(f"(auto: measuring failed: {exc}; keeping {kw['mode']})", file=sys.stderr)
            else:
                if kw.get("mode") == auto.row.mode:  # not changed by hand meanwhile
                    rt = done.runtime
                    kw.update(mode=done.row.mode, steps=done.row.steps)
                    print(f"({done.reason})", file=sys.stderr)
            measuring = None
        if line.startswith("/"):
            cmd, _, arg = line[1:].partition(" ")
            if cmd in ("quit", "exit", "q"):
                return 0
            if cmd == "new":
                messages.clear()
                saved.conversation = None
                print("(new conversation)", file=sys.stderr)
            elif cmd in SETTINGS and arg.strip():
                key, parse = SETTINGS[cmd]
                try:
                    value = parse(arg.strip())
                    rt.options(**{**kw, key: value})  # the runtime's own check of every option
                except ValueError:
                    print(f"error: /{cmd} takes a number, got {arg.strip()!r}", file=sys.stderr)
                except UserError as exc:
                    msg = str(exc).replace("--temperature", "/temp").replace("--steps", "/steps")
                    print(f"error: {msg}", file=sys.stderr)
                else:
                    kw[key] = value
                    if key == "steps" and kw.get("mode") != "diffusion":
                        kw["mode"] = "diffusion"  # a step budget means diffusion, as --steps does
                    print(f"({cmd} {value}{', mode diffusion' if key == 'steps' else ''})", file=sys.stderr)
            else:
                print(f"commands: /mode {{{','.join(MODES)}}}, /steps N, /temp T, /new, /quit", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        cancel = threading.Event()
        reply = []
        try:
            for ev in rt.stream(list(messages), cancel=cancel, **kw):
                if isinstance(ev, Text):
                    reply.append(ev.delta)
                    sys.stdout.write(ev.delta)
                    sys.stdout.flush()
                elif isinstance(ev, Done):
                    r = ev.result
                    acc = f", {r.mean_accepted:.2f}/cycle" if r.mean_accepted is not None else ""
                    print(f"\n[{r.mode} · {r.tokens_per_s:.1f} tok/s · TPF {r.tpf:.2f}{acc}]", file=sys.stderr)
        except KeyboardInterrupt:
            cancel.set()
            print("\n[stopped]", file=sys.stderr)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": "".join(reply)})
        saved.add(messages[-2:])
