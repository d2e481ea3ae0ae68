"""Conversations in SQLite under the user data directory.

Every write is its own transaction in WAL mode with `synchronous=FULL`, so killing the app at any
moment (mid-answer included) leaves a readable database with every earlier message intact; a
streaming answer is saved as it grows.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY, title TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY, conversation INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL, content TEXT NOT NULL, created REAL NOT NULL, meta TEXT);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation, id);
"""


def default_path() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("edge-dlm", appauthor=False)) / "chats.sqlite3"


class Store:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and not str(exc).startswith(("no such column", "no such table")):
                raise  # locked, read-only, unreadable: the caller says the chat is not saved, and why
            from edge_dlm.primitives.fsutil import set_aside  # not a database, malformed, another schema

            for side in ("-wal", "-shm"):
                Path(str(self.path) + side).unlink(missing_ok=True)
            set_aside(self.path, f"not a readable chat database: {exc}")
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(SCHEMA)
            db.execute("SELECT id, title, updated FROM conversations LIMIT 1").fetchall()
            db.execute("SELECT id, conversation, role, content, created, meta FROM messages LIMIT 1").fetchall()
        except BaseException:
            db.close()
            raise
        return db

    def _write(self, sql: str, args: tuple) -> int:
        with self._lock:
            cur = self._db.execute(sql, args)
            return cur.lastrowid

    def new_conversation(self, title: str = "New chat") -> int:
        now = time.time()
        return self._write("INSERT INTO conversations(title, created, updated) VALUES (?, ?, ?)",
                           (title, now, now))

    def rename(self, conversation: int, title: str) -> None:
        self._write("UPDATE conversations SET title = ? WHERE id = ?", (title[:80], conversation))

    def add_message(self, conversation: int, role: str, content: str, meta: str | None = None) -> int:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN")
            cur = self._db.execute("INSERT INTO messages(conversation, role, content, created, meta) "
                                   "VALUES (?, ?, ?, ?, ?)", (conversation, role, content, now, meta))
            self._db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation))
            self._db.execute("COMMIT")
            return cur.lastrowid

    def update_message(self, message: int, content: str, meta: str | None = None) -> None:
        self._write("UPDATE messages SET content = ?, meta = COALESCE(?, meta) WHERE id = ?",
                    (content, meta, message))

    def delete_message(self, message: int) -> None:
        self._write("DELETE FROM messages WHERE id = ?", (message,))

    def conversations(self) -> list[tuple[int, str, float]]:
        with self._lock:
            return self._db.execute("SELECT id, title, updated FROM conversations ORDER BY updated DESC").fetchall()

    def messages(self, conversation: int) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT id, role, content FROM messages WHERE conversation = ? "
                                    "ORDER BY id", (conversation,)).fetchall()
        return [{"id": i, "role": r, "content": c} for i, r, c in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
