"""The web page's own API, under /web/api (behind the server's API key when one is set).

    GET    /web/api/conversations                 -> {"object": "list", "data": [conversation, ...]}
    POST   /web/api/conversations  {title?}       -> 201 conversation
    GET    /web/api/conversations/{id}            -> conversation with "messages"
    PATCH  /web/api/conversations/{id}  {title}   -> conversation
    DELETE /web/api/conversations/{id}            -> {"id", "object", "deleted": true}
    POST   /web/api/conversations/{id}/messages  {messages: [...]}  -> conversation (a turn appended)
    GET    /web/api/tools                         -> {"object": "list", "data": [OpenAI tool schema], "error"}
    POST   /web/api/tools/{name}  {arguments}     -> {"name", "content"}

The page streams answers from /v1/chat/completions itself and saves each finished (or
stopped) turn here. Errors are the server's OpenAI-shaped JSON: 400 for a bad body,
404 for an unknown conversation or tool.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, field_validator

from qwenkit.server.errors import APIError
from qwenkit.server.web.conversations import (
    ConversationNotFound, ConversationStore, NewConversation, Rename, Turn, check_unicode,
)
from qwenkit.server.web.toolbox import Toolbox


class ToolRun(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arguments: str | dict[str, Any] = "{}"

    @field_validator("arguments")
    @classmethod
    def _unicode(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        check_unicode(value, "arguments")
        return value


class LazyStore:
    """The conversation store, opened on first use: a server that only answers the API
    never creates the file."""

    def __init__(self, path: Path):
        self.path = path
        self._store: ConversationStore | None = None
        self._lock = threading.Lock()

    def __call__(self) -> ConversationStore:
        with self._lock:
            if self._store is None:
                try:
                    self._store = ConversationStore(self.path)
                except (OSError, sqlite3.Error) as e:
                    raise APIError(503, f"the conversation store {self.path} cannot be opened: {e}") from e
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()


def _not_found(conversation_id: str) -> APIError:
    return APIError(404, f"no conversation {conversation_id!r}", param="id", code="conversation_not_found")


def api_router(store: LazyStore, toolbox: Toolbox | None) -> APIRouter:
    """The routes above, over `store` and (when the server has MCP servers) `toolbox`."""
    router = APIRouter(prefix="/web/api", tags=["web page"])

    # Plain `def` handlers: SQLite and MCP calls block, so they run on the thread pool.

    @router.get("/conversations", summary="The web page's conversations, latest first")
    def list_conversations():
        return {"object": "list", "data": store().list()}

    @router.post("/conversations", status_code=201, summary="Start a conversation")
    def create_conversation(body: NewConversation | None = None):
        return store().create(body.title if body else None)

    @router.get("/conversations/{conversation_id}", summary="A conversation and its messages")
    def get_conversation(conversation_id: str):
        try:
            return store().get(conversation_id)
        except ConversationNotFound:
            raise _not_found(conversation_id) from None

    @router.patch("/conversations/{conversation_id}", summary="Rename a conversation")
    def rename_conversation(conversation_id: str, body: Rename):
        try:
            return store().rename(conversation_id, body.title)
        except ConversationNotFound:
            raise _not_found(conversation_id) from None

    @router.delete("/conversations/{conversation_id}", summary="Delete a conversation and its messages")
    def delete_conversation(conversation_id: str):
        try:
            store().delete(conversation_id)
        except ConversationNotFound:
            raise _not_found(conversation_id) from None
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    @router.post("/conversations/{conversation_id}/messages", summary="Append a turn to a conversation")
    def append_turn(conversation_id: str, body: Turn):
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            return store().append(conversation_id, messages)
        except ConversationNotFound:
            raise _not_found(conversation_id) from None

    @router.get("/tools", summary="The MCP tools the model may call")
    def list_tools():
        if toolbox is None:
            return {"object": "list", "data": [], "error": None}
        return {"object": "list", "data": toolbox.schemas(), "error": toolbox.error}

    @router.post("/tools/{name}", summary="Run an MCP tool on the model's arguments")
    def run_tool(name: str, body: ToolRun):
        tool = toolbox.tool(name) if toolbox is not None else None
        if tool is None:
            raise APIError(404, f"no tool {name!r}", param="name", code="tool_not_found")
        # A failing tool answers "Error: ..." as its text, for the model to read.
        return {"name": name, "content": tool.invoke(body.arguments)}

    return router
