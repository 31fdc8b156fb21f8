"""The web page's conversations: titles in a small table beside the chat memory's messages.

Messages live in `SQLiteChatMemory` (one row per message, a turn written at once); this
module adds a `web_conversations` table in the same SQLite file with each conversation's
title and times. No torch, no HTTP: the routes in `qwenkit.server.web.api` call it.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from qwenkit.client.memory import SQLiteChatMemory

MAX_TITLE_CHARS = 200
AUTO_TITLE_CHARS = 60

_SCHEMA = """
CREATE TABLE IF NOT EXISTS web_conversations (
    id TEXT PRIMARY KEY,
    title TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""


# -- request bodies --------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolCallFunction(_Strict):
    name: str = Field(min_length=1, max_length=256)
    arguments: str = ""


class ToolCallItem(_Strict):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: ToolCallFunction


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# A token count: an integer as JSON Schema counts them (2.0 is one, true and 2.5 are not).
TokenCount = Annotated[int, BeforeValidator(_integral), Field(ge=0, le=2**63 - 1),
                       WithJsonSchema({"type": "integer", "minimum": 0, "maximum": 2**63 - 1})]


class StoredUsage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # OpenAI's usage object, as the stream sent it
    prompt_tokens: TokenCount
    completion_tokens: TokenCount
    total_tokens: TokenCount | None = None
    completion_tokens_details: dict[str, TokenCount | None] | None = None
    prompt_tokens_details: dict[str, TokenCount | None] | None = None


Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class StoredMeta(_Strict):
    """What the page shows under an answer. Typed on write: one bad value stored here once
    made its conversation impossible to open."""

    model_config = ConfigDict(extra="forbid", strict=True)
    elapsed_s: Seconds | None = None
    thinking_s: Seconds | None = None
    tokens_per_s: Seconds | None = None
    usage: StoredUsage | None = None
    stopped: bool | None = None
    error: str | None = None


class StoredTextPart(_Strict):
    type: Literal["text"]
    text: str


class StoredImageURL(_Strict):
    url: str = Field(pattern=r"^data:image/[a-z0-9.+-]+;base64,")  # the page sends images inline


class StoredImagePart(_Strict):
    type: Literal["image_url"]
    image_url: StoredImageURL


ContentPart = Annotated[StoredTextPart | StoredImagePart, Field(discriminator="type")]


class StoredMessage(_Strict):
    """One message of a turn as the page saves it: OpenAI's chat fields, the reasoning,
    and `meta` (usage, timings, whether the user stopped it) that is shown, never sent
    to the model."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None  # a list: a user message with images
    reasoning_content: str | None = None
    tool_calls: list[ToolCallItem] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    meta: StoredMeta | None = None


# What `clean_title` accepts, as the published schema can say it: not blank (the pattern is
# checked by clean_title, which says so in words), at most 200 characters.
Title = Annotated[str, Field(min_length=1, max_length=MAX_TITLE_CHARS, json_schema_extra={"pattern": r"\S"})]


class NewConversation(_Strict):
    title: Title | None = None

    @field_validator("title")
    @classmethod
    def _title(cls, value: str | None) -> str | None:
        return None if value is None else clean_title(value)


class Rename(_Strict):
    title: Title

    @field_validator("title")
    @classmethod
    def _title(cls, value: str) -> str:
        return clean_title(value)


class Turn(_Strict):
    messages: list[StoredMessage] = Field(min_length=1, max_length=256)

    @model_validator(mode="after")
    def _unicode(self) -> Turn:
        check_unicode([m.model_dump(exclude_none=True) for m in self.messages], "messages")
        return self


def check_unicode(value: Any, what: str) -> None:
    """JSON allows lone surrogates ("\\ud800") that UTF-8, hence SQLite and the response, cannot hold."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} holds text that is not valid Unicode (a lone surrogate)") from None


def clean_title(title: str) -> str:
    check_unicode(title, "the title")
    title = " ".join(title.split())
    if not title:
        raise ValueError("a title must not be blank")
    if len(title) > MAX_TITLE_CHARS:
        raise ValueError(f"a title has at most {MAX_TITLE_CHARS} characters, got {len(title)}")
    return title


def auto_title(messages: list[dict[str, Any]]) -> str | None:
    """A title from the first user message: its first line, cut to a few words."""
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # a message with images: its text parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if m.get("role") == "user" and isinstance(content, str) and content.strip():
            text = " ".join(content.split())
            return text if len(text) <= AUTO_TITLE_CHARS else text[:AUTO_TITLE_CHARS - 1].rstrip() + "…"
    return None


# -- the store ---------------------------------------------------------------------------


class ConversationNotFound(KeyError):
    pass


class ConversationStore:
    """Conversations of the web page in the SQLite file at `path` (created with its folder).

    A delete removes the conversation and its messages, and an append checks that the
    conversation exists and writes the turn, each in one transaction: a process killed
    midway, or a delete racing an append from another process, leaves no message behind
    that belongs to no conversation."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.memory = SQLiteChatMemory(self.path, max_messages=None)
        with self.memory.transaction() as db:
            db.execute(_SCHEMA)

    @contextlib.contextmanager
    def _db(self):
        # Reads: a short-lived connection per call (handlers run on a thread pool, and
        # opening a local SQLite file costs microseconds). Writes go through
        # `memory.transaction()`, so that messages and conversations change together.
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    def list(self) -> list[dict[str, Any]]:
        """Every conversation, the latest updated first."""
        with self._db() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM web_conversations ORDER BY updated_at DESC, rowid DESC")
            return [_summary(r) for r in rows.fetchall()]

    def create(self, title: str | None = None) -> dict[str, Any]:
        now = time.time()
        conversation_id = "conv_" + secrets.token_hex(8)
        with self.memory.transaction() as db:
            db.execute("INSERT INTO web_conversations (id, title, created_at, updated_at) VALUES (?, ?, ?, ?)",
                       (conversation_id, title, now, now))
        return _summary((conversation_id, title, now, now))

    def summary(self, conversation_id: str) -> dict[str, Any]:
        with self._db() as db:
            return _summary(_row(db, conversation_id))

    def get(self, conversation_id: str) -> dict[str, Any]:
        """The conversation with all its messages."""
        out = self.summary(conversation_id)
        out["messages"] = self.memory.get(conversation_id)
        return out

    def rename(self, conversation_id: str, title: str) -> dict[str, Any]:
        with self.memory.transaction() as db:
            db.execute("UPDATE web_conversations SET title = ? WHERE id = ?", (title, conversation_id))
            return _summary(_row(db, conversation_id))

    def delete(self, conversation_id: str) -> None:
        with self.memory.transaction() as db:
            found = db.execute("DELETE FROM web_conversations WHERE id = ?", (conversation_id,))
            if found.rowcount == 0:
                raise ConversationNotFound(conversation_id)
            self.memory.clear(conversation_id)

    def append(self, conversation_id: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """Add a turn; an untitled conversation takes its title from the first user message."""
        with self.memory.transaction() as db:
            db.execute("UPDATE web_conversations SET title = COALESCE(title, ?), updated_at = ? WHERE id = ?",
                       (auto_title(messages), time.time(), conversation_id))
            summary = _summary(_row(db, conversation_id))  # ConversationNotFound rolls back: nothing written
            self.memory.add(conversation_id, messages)
        return summary

    def orphan_message_count(self) -> int:
        """Messages whose conversation is gone: none, unless something else writes the file."""
        with self._db() as db:
            return db.execute("SELECT COUNT(*) FROM messages "
                              "WHERE conversation_id NOT IN (SELECT id FROM web_conversations)").fetchone()[0]

    def close(self) -> None:
        self.memory.close()


_COLUMNS = "id, title, created_at, updated_at"


def _row(db: sqlite3.Connection, conversation_id: str) -> tuple:
    row = db.execute(f"SELECT {_COLUMNS} FROM web_conversations WHERE id = ?", (conversation_id,)).fetchone()
    if row is None:
        raise ConversationNotFound(conversation_id)
    return row


def _summary(row: tuple) -> dict[str, Any]:
    conversation_id, title, created_at, updated_at = row
    return {"id": conversation_id, "object": "conversation", "title": title,
            "created_at": int(created_at), "updated_at": int(updated_at)}
