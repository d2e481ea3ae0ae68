"""The conversation database survives a kill mid-answer."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time

from edge_dlm.tui.store import Store

WRITER = """
import sys, time
from edge_dlm.tui.store import Store
s = Store(sys.argv[1])
c = s.new_conversation("t")
for i in range(3):
    s.add_message(c, "user", f"question {i}")
    s.add_message(c, "assistant", f"answer {i}")
s.add_message(c, "user", "last question")
m = s.add_message(c, "assistant", "")
print("ready", flush=True)
text = ""
while True:  # an answer streaming forever, saved as it grows
    text += "token "
    s.update_message(m, text)
"""


def test_kill_mid_answer_keeps_every_earlier_message(tmp_path):
    db = tmp_path / "chats.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    msgs = Store(db).messages(1)
    assert [m["content"] for m in msgs[:7]] == ["question 0", "answer 0", "question 1", "answer 1",
                                                "question 2", "answer 2", "last question"]
    assert msgs[7]["role"] == "assistant" and msgs[7]["content"].startswith("token")


def test_conversations_listed_newest_first(tmp_path):
    s = Store(tmp_path / "db.sqlite3")
    a = s.new_conversation("a")
    b = s.new_conversation("b")
    s.add_message(a, "user", "x")
    assert [c[0] for c in s.conversations()] == [a, b]


def test_a_damaged_database_is_set_aside_and_a_new_one_made(tmp_path, capsys):
    """Junk, a file cut short, another program's tables: moved to NAME.bad with one line, and chats are
    saved again at once (never a chat that silently stops saving)."""
    good = tmp_path / "good.sqlite3"
    s = Store(good)
    s.add_message(s.new_conversation("t"), "user", "x" * 20000)
    s._db.close()
    cases = {"junk": b"not a database at all " * 100, "cut": good.read_bytes()[:3000]}
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, text TEXT)")
    cases["schema"] = other.read_bytes()
    for name, data in cases.items():
        path = tmp_path / f"{name}.sqlite3"
        path.write_bytes(data)
        capsys.readouterr()
        store = Store(path)
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "set aside the damaged file" in err, (name, err)
        assert (tmp_path / f"{name}.sqlite3.bad").exists()  # kept for a look (SQLite may have touched its header)
        c = store.new_conversation("again")
        store.add_message(c, "user", "saved")
        assert [t for _, t, _ in store.conversations()] == ["again"]



def test_doctor_lists_what_was_set_aside(tmp_path, monkeypatch, capsys):
    from edge_dlm.cli import main
    from edge_dlm.tui.store import default_path

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    path = default_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"junk" * 100)
    Store()
    capsys.readouterr()
    assert main(["doctor"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("set aside"))
    assert str(path) + ".bad" in line
