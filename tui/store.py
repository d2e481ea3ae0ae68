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
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

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
