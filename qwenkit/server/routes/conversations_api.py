"""OpenAI's conversations (``/v1/conversations``): create, retrieve, update the metadata
of and delete a conversation; add, list, retrieve and delete its items. Kept in the
Responses API's SQLite store, where a Responses request with ``conversation`` reads and
extends them."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Query

from qwenkit.server import conversations_protocol as cp
from qwenkit.server import responses_protocol as rp
from qwenkit.server.errors import APIError
from qwenkit.server.response_store import DuplicateItem, ResponseStore
from qwenkit.server.routes.context import as_400


def missing_conversation(conversation_id: str, param: str = "conversation_id") -> APIError:
    return APIError(404, f"no conversation {conversation_id!r}", param=param, code="not_found")


def conversations_router(store: ResponseStore) -> APIRouter:
    router = APIRouter()

    async def existing(conversation_id: str) -> dict:
        conversation = await asyncio.to_thread(store.get_conversation, conversation_id)
        if conversation is None:
            raise missing_conversation(conversation_id)
        return conversation

    @router.post("/v1/conversations", summary="Create a conversation", response_model=cp.ConversationObject)
    async def create_conversation(body: cp.ConversationCreate):
        rp.check_unicode(body.model_dump(exclude_none=True))
        items = as_400(cp.checked_items, body.items)
        try:
            return await asyncio.to_thread(store.create_conversation, rp.new_id("conv"), body.metadata or {}, items)
        except DuplicateItem as e:
            raise APIError(400, str(e), param="items") from e

    @router.get("/v1/conversations/{conversation_id}", summary="A conversation",
                response_model=cp.ConversationObject)
    async def get_conversation(conversation_id: str):
        return await existing(conversation_id)

    @router.post("/v1/conversations/{conversation_id}", summary="Update a conversation's metadata",
                 response_model=cp.ConversationObject)
    async def update_conversation(conversation_id: str, body: cp.ConversationUpdate):
        rp.check_unicode(body.model_dump(exclude_none=True))
        conversation = await asyncio.to_thread(store.update_conversation, conversation_id, body.metadata or {})
        if conversation is None:
            raise missing_conversation(conversation_id)
        return conversation

    @router.delete("/v1/conversations/{conversation_id}", summary="Delete a conversation and its items",
                   response_model=cp.ConversationDeletedResource)
    async def delete_conversation(conversation_id: str):
        if not await asyncio.to_thread(store.delete_conversation, conversation_id):
            raise missing_conversation(conversation_id)
        return cp.ConversationDeletedResource(id=conversation_id)

    @router.post("/v1/conversations/{conversation_id}/items", summary="Add items to a conversation",
                 response_model=rp.ItemList)
    async def add_items(conversation_id: str, body: cp.ItemsCreate):
        rp.check_unicode(body.model_dump(exclude_none=True))
        items = as_400(cp.checked_items, body.items)
        try:
            added = await asyncio.to_thread(store.add_items, conversation_id, items)
        except DuplicateItem as e:
            raise APIError(400, str(e), param="items") from e
        if not added:
            raise missing_conversation(conversation_id)
        return rp.item_page(items, order="asc", limit=len(items), after=None)

    @router.get("/v1/conversations/{conversation_id}/items", summary="A conversation's items",
                response_model=rp.ItemList)
    async def list_items(conversation_id: str, order: Literal["asc", "desc"] = "desc",
                         limit: int = Query(20, ge=1, le=100), after: str | None = None):
        items = await asyncio.to_thread(store.items, conversation_id)
        if items is None:
            raise missing_conversation(conversation_id)
        return as_400(lambda: rp.item_page(items, order=order, limit=limit, after=after))

    @router.get("/v1/conversations/{conversation_id}/items/{item_id}", summary="One item of a conversation")
    async def get_item(conversation_id: str, item_id: str) -> dict:
        await existing(conversation_id)
        item = await asyncio.to_thread(store.item, conversation_id, item_id)
        if item is None:
            raise APIError(404, f"conversation {conversation_id!r} has no item {item_id!r}", param="item_id",
                           code="not_found")
        return item

    @router.delete("/v1/conversations/{conversation_id}/items/{item_id}", summary="Delete an item",
                   response_model=cp.ConversationObject)
    async def delete_item(conversation_id: str, item_id: str):
        conversation = await existing(conversation_id)
        if not await asyncio.to_thread(store.delete_item, conversation_id, item_id):
            raise APIError(404, f"conversation {conversation_id!r} has no item {item_id!r}", param="item_id",
                           code="not_found")
        return conversation

    return router
