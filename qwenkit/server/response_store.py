"""Stored responses of ``POST /v1/responses``, for ``previous_response_id`` and
``GET /v1/responses/{id}``: one SQLite file (default ``responses.sqlite3`` in the qwenkit
home), opened at the first request that stores or reads (a server that never serves the
Responses API never creates it).

Each row holds the response object as returned and the conversation it ended: earlier
turns, its input and its output as chat messages (without ``instructions``, which OpenAI
does not carry over), so a follow-up request only appends its own input.
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
"""


class ResponseStore:
    """Responses in the SQLite file at ``path`` (created, with its folder, on first use)."""

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
                    self._ready = True
                yield db
            finally:
                db.close()

    def save(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO responses (id, created_at, response, conversation) VALUES (?, ?, ?, ?)",
                       (response["id"], time.time(), json.dumps(response, ensure_ascii=False),
                        json.dumps(conversation, ensure_ascii=False)))

    def response(self, response_id: str) -> dict[str, Any] | None:
        """The stored response object, or None."""
        return self._column("response", response_id)

    def conversation(self, response_id: str) -> list[dict[str, Any]] | None:
        """The chat messages through the response's output, or None."""
        return self._column("conversation", response_id)

    def delete(self, response_id: str) -> bool:
        with self._db() as db:
            return db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def _column(self, column: str, response_id: str) -> Any:
        with self._db() as db:
            row = db.execute(f"SELECT {column} FROM responses WHERE id = ?", (response_id,)).fetchone()
        return json.loads(row[0]) if row is not None else None
