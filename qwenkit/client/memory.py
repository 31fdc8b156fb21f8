"""Chat memory: the messages of each conversation, keyed by its id.

`add` stores a whole turn (the user message, any tool rounds, the answer) at once, so
a conversation never holds half a turn. `get` returns at most the last `max_messages`,
cut so that the window starts at a user message. Assistant turns keep their
`reasoning_content`; the memory advisors strip it before the model sees the history.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["ChatMemory", "InMemoryChatMemory", "SQLiteChatMemory"]

Message = dict[str, Any]


class ChatMemory:
    """Where conversations live. `max_messages` bounds what `get` returns (None: all)."""

    def __init__(self, max_messages: int | None = 20):
        if max_messages is not None and max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}")
        self.max_messages = max_messages

    def add(self, conversation_id: str, messages: list[Message]) -> None:
        raise NotImplementedError

    def get(self, conversation_id: str, last_n: int | None = None) -> list[Message]:
        raise NotImplementedError

    def clear(self, conversation_id: str) -> None:
        raise NotImplementedError

    def conversation_ids(self) -> list[str]:
        raise NotImplementedError

    def _window(self, messages: list[Message], last_n: int | None) -> list[Message]:
        n = last_n if last_n is not None else self.max_messages
        if n is None or len(messages) <= n:
            return messages
        window = messages[-n:]
        # A window that starts inside a turn (a tool result, an assistant reply) confuses
        # the model: start at the first user message in it.
        for i, m in enumerate(window):
            if m.get("role") == "user":
                return window[i:]
        return []


class InMemoryChatMemory(ChatMemory):
    """Conversations in a dict, for one process; safe across threads."""

    def __init__(self, max_messages: int | None = 20):
        super().__init__(max_messages)
        self._lock = threading.Lock()
        self._store: dict[str, list[Message]] = defaultdict(list)

    def add(self, conversation_id: str, messages: list[Message]) -> None:
        copies = json.loads(json.dumps(messages))
        with self._lock:
            self._store[conversation_id].extend(copies)

    def get(self, conversation_id: str, last_n: int | None = None) -> list[Message]:
        with self._lock:
            messages = list(self._store.get(conversation_id, ()))
        return self._window(messages, last_n)

    def clear(self, conversation_id: str) -> None:
        with self._lock:
            self._store.pop(conversation_id, None)

    def conversation_ids(self) -> list[str]:
        with self._lock:
            return list(self._store)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL,
    message TEXT NOT NULL,
    created_at REAL NOT NULL DEFAULT (julianday('now'))
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, id);
"""


class SQLiteChatMemory(ChatMemory):
    """Conversations in a SQLite file, persistent across restarts.

    WAL journal: readers do not block the writer, and a turn is written in one
    transaction, so a process killed mid-write loses at most that turn. One connection
    per thread; other processes may open the same file (SQLite locks it; `timeout`
    seconds of waiting for the lock)."""

    def __init__(self, path: str | Path, max_messages: int | None = 20, *, timeout: float = 30.0):
        super().__init__(max_messages)
        self.path = str(path)
        self.timeout = timeout
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                 check_same_thread=False)  # so close() may run on any thread
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE: it holds the file's write lock from the
        start) on this thread's connection. `add` and `clear` called inside it, and what the
        caller writes with the connection, commit together or not at all."""
        db = self._connect()
        if db.in_transaction:  # nested: the outer transaction commits
            yield db
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def add(self, conversation_id: str, messages: list[Message]) -> None:
        rows = [(conversation_id, json.dumps(m, ensure_ascii=False)) for m in messages]
        with self.transaction() as db:
            db.executemany("INSERT INTO messages (conversation_id, message) VALUES (?, ?)", rows)

    def get(self, conversation_id: str, last_n: int | None = None) -> list[Message]:
        n = last_n if last_n is not None else self.max_messages
        db = self._connect()
        if n is None:
            rows = db.execute("SELECT message FROM messages WHERE conversation_id = ? ORDER BY id",
                              (conversation_id,)).fetchall()
        else:
            rows = db.execute("SELECT message FROM (SELECT id, message FROM messages WHERE conversation_id = ? "
                              "ORDER BY id DESC LIMIT ?) ORDER BY id", (conversation_id, n + 1)).fetchall()  # +1: cut or not
        return self._window([json.loads(r[0]) for r in rows], last_n)

    def clear(self, conversation_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))

    def conversation_ids(self) -> list[str]:
        rows = self._connect().execute(
            "SELECT conversation_id FROM messages GROUP BY conversation_id ORDER BY MIN(id)").fetchall()
        return [r[0] for r in rows]

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
        self._local = threading.local()
