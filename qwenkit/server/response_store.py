"""Stored responses of ``POST /v1/responses`` (for ``previous_response_id``,
``GET /v1/responses/{id}`` and its input items) and OpenAI's conversations
(``/v1/conversations``, which a response may extend): one SQLite file (default
``responses.sqlite3`` in the qwenkit home), opened at the first request that stores or
reads (a server that never serves these APIs never creates it).

Each response row holds the response object as returned, its input items as listed, and
the conversation it ended: earlier turns, its input and its output as chat messages
(without ``instructions``, which OpenAI does not carry over), so a follow-up request only
appends its own input. A conversation is its metadata and its items in the order they
were added (Responses items, each with its id).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from qwenkit.paths import responses_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    response TEXT NOT NULL,      -- the response object, JSON
    conversation TEXT NOT NULL   -- chat messages through this response's output, JSON
);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    metadata TEXT NOT NULL       -- JSON object
);
CREATE TABLE IF NOT EXISTS conversation_items (
    position INTEGER PRIMARY KEY AUTOINCREMENT,  -- the order items were added in
    conversation_id TEXT NOT NULL,
    id TEXT NOT NULL,
    item TEXT NOT NULL,                          -- the item, JSON
    UNIQUE (conversation_id, id)
);
"""
# Added after the first release: a file made before has no such column yet.
_COLUMNS = {"responses": {"input_items": "TEXT NOT NULL DEFAULT '[]'"}}


class DuplicateItem(ValueError):
    """An item id the conversation already holds."""


class ResponseStore:
    """Responses and conversations in the SQLite file at ``path`` (created, with its
    folder, on first use)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path).expanduser() if path is not None else None
        self._lock = threading.Lock()
        self._ready = False

    @contextlib.contextmanager
    def _db(self):
        with self._lock:
            if not self._ready:
                self.path = self.path or responses_db()
                self.path.parent.mkdir(parents=True, exist_ok=True)
            # A short-lived connection per call: opening a local SQLite file costs microseconds.
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            try:
                if not self._ready:
                    db.executescript(_SCHEMA)
                    for table, columns in _COLUMNS.items():
                        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                        for name, kind in columns.items():
                            if name not in have:
                                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
                    self._ready = True
                yield db
            finally:
                db.close()

    # -- responses -----------------------------------------------------------------------

    def save(self, response: dict[str, Any], conversation: list[dict[str, Any]],
             input_items: list[dict[str, Any]] | None = None) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO responses (id, created_at, response, conversation, input_items) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (response["id"], time.time(), _json(response), _json(conversation), _json(input_items or [])))

    def response(self, response_id: str) -> dict[str, Any] | None:
        """The stored response object, or None."""
        return self._column("response", response_id)

    def conversation(self, response_id: str) -> list[dict[str, Any]] | None:
        """The chat messages through the response's output, or None."""
        return self._column("conversation", response_id)

    def input_items(self, response_id: str) -> list[dict[str, Any]] | None:
        """The response's input items (oldest first), or None."""
        return self._column("input_items", response_id)

    def delete(self, response_id: str) -> bool:
        with self._db() as db:
            return db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def _column(self, column: str, response_id: str) -> Any:
        with self._db() as db:
            row = db.execute(f"SELECT {column} FROM responses WHERE id = ?", (response_id,)).fetchone()
        return json.loads(row[0]) if row is not None else None

    # -- conversations -------------------------------------------------------------------

    def create_conversation(self, conversation_id: str, metadata: dict[str, str],
                            items: list[dict[str, Any]]) -> dict[str, Any]:
        """A new conversation holding ``items``; returns its object."""
        created = int(time.time())
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("INSERT INTO conversations (id, created_at, metadata) VALUES (?, ?, ?)",
                           (conversation_id, created, _json(metadata)))
                self._insert_items(db, conversation_id, items)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        return _conversation(conversation_id, created, metadata)

    def get_conversation(self, conversation_id: str) -> dict[str, Any] | None:
        with self._db() as db:
            row = db.execute("SELECT created_at, metadata FROM conversations WHERE id = ?",
                             (conversation_id,)).fetchone()
        return None if row is None else _conversation(conversation_id, row[0], json.loads(row[1]))

    def update_conversation(self, conversation_id: str, metadata: dict[str, str]) -> dict[str, Any] | None:
        with self._db() as db:
            if db.execute("UPDATE conversations SET metadata = ? WHERE id = ?",
                          (_json(metadata), conversation_id)).rowcount == 0:
                return None
        return self.get_conversation(conversation_id)

    def delete_conversation(self, conversation_id: str) -> bool:
        with self._db() as db:
            db.execute("DELETE FROM conversation_items WHERE conversation_id = ?", (conversation_id,))
            return db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount > 0

    def add_items(self, conversation_id: str, items: list[dict[str, Any]]) -> bool:
        """Append ``items``; False if there is no such conversation. DuplicateItem (and
        nothing added) for an id the conversation already holds."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                known = db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
                if known is not None:
                    self._insert_items(db, conversation_id, items)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        return known is not None

    def items(self, conversation_id: str) -> list[dict[str, Any]] | None:
        """The conversation's items, oldest first (None: no such conversation)."""
        with self._db() as db:
            if db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
                return None
            rows = db.execute("SELECT item FROM conversation_items WHERE conversation_id = ? ORDER BY position",
                              (conversation_id,)).fetchall()
        return [json.loads(row[0]) for row in rows]

    def item(self, conversation_id: str, item_id: str) -> dict[str, Any] | None:
        with self._db() as db:
            row = db.execute("SELECT item FROM conversation_items WHERE conversation_id = ? AND id = ?",
                             (conversation_id, item_id)).fetchone()
        return None if row is None else json.loads(row[0])

    def delete_item(self, conversation_id: str, item_id: str) -> bool:
        with self._db() as db:
            return db.execute("DELETE FROM conversation_items WHERE conversation_id = ? AND id = ?",
                              (conversation_id, item_id)).rowcount > 0

    @staticmethod
    def _insert_items(db: sqlite3.Connection, conversation_id: str, items: list[dict[str, Any]]) -> None:
        for item in items:
            try:
                db.execute("INSERT INTO conversation_items (conversation_id, id, item) VALUES (?, ?, ?)",
                           (conversation_id, item["id"], _json(item)))
            except sqlite3.IntegrityError:
                raise DuplicateItem(f"the conversation already holds an item {item['id']!r}") from None


def _conversation(conversation_id: str, created_at: int, metadata: dict[str, str]) -> dict[str, Any]:
    return {"id": conversation_id, "object": "conversation", "created_at": created_at, "metadata": metadata}


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
