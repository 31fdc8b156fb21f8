"""OpenAI's conversations API (``/v1/conversations``): the request and answer shapes.

A conversation is a list of Responses items (messages, function calls and their outputs,
reasoning) that the server keeps: a client adds items, lists them, and a Responses request
with ``conversation`` reads them as its earlier turns and appends its input and output
(the OpenAI Agents SDK's ``OpenAIConversationsSession`` keeps its history this way).
Shapes follow the `openai` SDK's ``openai.types.conversations``; items are checked as a
Responses request's ``input`` is (`responses_protocol.input_messages`). No I/O.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from qwenkit.server import responses_protocol as rp

MAX_ITEMS_PER_REQUEST = 20  # OpenAI's bound on items created at once


class ConversationCreate(rp._Model):
    items: list[rp.InputItem] | None = Field(None, max_length=MAX_ITEMS_PER_REQUEST)
    metadata: rp.Metadata | None = None


class ConversationUpdate(rp._Model):
    metadata: rp.Metadata | None


class ItemsCreate(rp._Model):
    items: list[rp.InputItem] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)
    include: list[str] | None = None  # accepted and ignored, as on listing


class ConversationObject(rp._Model):
    """The ``conversation`` object."""

    id: str
    object: Literal["conversation"] = "conversation"
    created_at: int
    metadata: dict[str, str]


class ConversationDeletedResource(rp._Model):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: Literal[True] = True


def checked_items(items: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Items to store, as listed (with ids); ValueError naming ``items[i]...`` for one the
    Responses API could not read back."""
    if not items:
        return []
    rp.input_messages(items, name="items")
    return rp.listed_items(items)
