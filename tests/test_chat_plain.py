"""The plain chat (`edge-dlm chat --plain`): commands checked by the runtime's own rules and confirmed,
bad ones one line and the chat goes on, conversations saved where the chat screen lists them."""

from __future__ import annotations

import os
import subprocess
import sys

EXE = [sys.executable, "-m", "edge_dlm.cli"]


def chat(tiny_ckpt, tmp_path, lines: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    return subprocess.run([*EXE, "chat", "--plain", "--model", str(tiny_ckpt), "--max-new-tokens", "4", *extra],
                          input=lines, capture_output=True, text=True, timeout=120, env=env)


def test_commands_are_checked_confirmed_and_never_end_the_chat(tiny_ckpt, tmp_path):
    p = chat(tiny_ckpt, tmp_path, "/temp abc\n/steps 99\n/mode foo\n/temp inf\n/steps 2\n/temp 0.5\n/mode ar\n"
             "hello\n/new\nagain\n/quit\n", "--mode", "ar")
    err = p.stderr
    assert p.returncode == 0 and "Traceback" not in err, err
    assert "error: /temp takes a number, got 'abc'" in err
    assert "error: /steps must be in 1..4" in err
    assert "error: mode 'foo' not supported" in err
    assert "error: /temp must be a number in 0..100" in err
    assert "(steps 2, mode diffusion)" in err and "(temp 0.5)" in err and "(mode ar)" in err
    assert "(new conversation)" in err and err.count("[ar ·") == 2  # both messages answered, in AR


def test_plain_chats_are_saved_for_the_chat_screen(tiny_ckpt, tmp_path):
    p = chat(tiny_ckpt, tmp_path, "first question\n/new\nsecond question\n/quit\n", "--mode", "ar")
    assert p.returncode == 0, p.stderr
    from edge_dlm.tui.store import Store

    store = Store(tmp_path / "data" / "edge-dlm" / "chats.sqlite3")
    titles = sorted(t for _, t, _ in store.conversations())
    assert titles == ["first question", "second question"]
    conv = [c for c, t, _ in store.conversations() if t == "first question"][0]
    assert [m["role"] for m in store.messages(conv)] == ["user", "assistant"]


def test_auto_answers_at_once_and_measures_in_the_background(tiny_ckpt, tmp_path):
    p = chat(tiny_ckpt, tmp_path, "hello\n/quit\n")
    assert p.returncode == 0, p.stderr
    assert "for now (measuring this machine in the background" in p.stderr
    assert "calibrating" not in p.stderr and "[ar ·" in p.stderr  # answered before any measurement
