"""OpenAI's Responses API: ``POST /v1/responses``, stored responses (which a later request
continues with ``previous_response_id``: retrieve, delete, list input items, cancel),
counting a request's input tokens, and OpenAI's conversations (routes in
:mod:`~qwenkit.server.routes.conversations_api`, on the same store)."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Query, Request

from qwenkit.server import responses_protocol as rp
from qwenkit.server.errors import APIError
from qwenkit.server.limits import prompt_texts
from qwenkit.server.respond import respond
from qwenkit.server.response_store import ResponseStore
from qwenkit.server.routes.context import ServerContext, as_400
from qwenkit.server.routes.conversations_api import conversations_router, missing_conversation
from qwenkit.server.watch import name_request

_STREAM = {200: {"content": {"text/event-stream": {
    "description": "with stream: true, typed events (response.created ... response.completed)"}}}}


def responses_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()
    store = ResponseStore(ctx.config.responses_db)

    async def prepare(body: rp.ResponsesRequest) -> rp.ResponsesCall:
        """The chat call of a request, with the turns it continues; every refusal (bad
        text, an unknown previous response or conversation) before anything is generated."""
        rp.check_unicode(body.model_dump(by_alias=True, exclude_none=True))
        conversation = as_400(rp.conversation_id, body)
        previous = None
        if body.previous_response_id:
            previous = await asyncio.to_thread(store.conversation, body.previous_response_id)
            if previous is None:
                raise APIError(404, f"previous_response_id {body.previous_response_id!r} is not a stored response",
                               param="previous_response_id", code="previous_response_not_found")
        elif conversation is not None:
            items = await asyncio.to_thread(store.items, conversation)
            if items is None:
                raise missing_conversation(conversation, param="conversation")
            previous = as_400(rp.input_messages, items, "conversation")
        call = as_400(rp.responses_call, body, previous)
        await ctx.check_prompt(prompt_texts(call.request.messages))
        return call

    @router.post("/v1/responses", summary="OpenAI Responses", response_model=rp.Response, responses=_STREAM)
    async def create_response(body: rp.ResponsesRequest, request: Request):
        model = ctx.check_model(body.model)
        call = await prepare(body)
        conversation = rp.conversation_id(body)
        builder = rp.ResponseBuilder(name_request(request, rp.new_id("resp")), model, body)
        chunks = await ctx.open_chat(call.request, builder.id)

        async def save() -> rp.Response:
            response = builder.final()
            dumped = response.model_dump(mode="json", by_alias=True)
            if body.store is not False:
                reply = builder.assistant_message()
                await asyncio.to_thread(store.save, dumped, call.conversation + ([reply] if reply else []),
                                        call.input_items)
            if conversation is not None:
                await asyncio.to_thread(store.add_items, conversation, call.input_items + dumped["output"])
            return response

        return await respond(request, chunks, rp.ResponsesAnswer(builder, save), stream=bool(body.stream))

    @router.post("/v1/responses/input_tokens", summary="Count a Responses request's input tokens",
                 response_model=rp.InputTokens)
    async def count_input_tokens(body: rp.ResponsesRequest):
        ctx.check_model(body.model)
        call = await prepare(body)
        prepared = await asyncio.to_thread(as_400, ctx.allm.llm.prepare_chat, call.request)
        return rp.InputTokens(input_tokens=len(prepared.prompt_token_ids))

    async def stored(response_id: str) -> dict:
        response = await asyncio.to_thread(store.response, response_id)
        if response is None:
            raise APIError(404, f"no stored response {response_id!r}", param="response_id", code="not_found")
        return response

    @router.get("/v1/responses/{response_id}", summary="A stored response", response_model=rp.Response)
    async def get_response(response_id: str):
        return await stored(response_id)

    @router.delete("/v1/responses/{response_id}", summary="Delete a stored response",
                   response_model=rp.ResponseDeleted)
    async def delete_response(response_id: str):
        if not await asyncio.to_thread(store.delete, response_id):
            raise APIError(404, f"no stored response {response_id!r}", param="response_id", code="not_found")
        return rp.ResponseDeleted(id=response_id)

    @router.get("/v1/responses/{response_id}/input_items", summary="A stored response's input items",
                response_model=rp.ItemList)
    async def list_input_items(response_id: str, order: Literal["asc", "desc"] = "desc",
                               limit: int = Query(20, ge=1, le=100), after: str | None = None):
        await stored(response_id)
        items = await asyncio.to_thread(store.input_items, response_id)
        return as_400(lambda: rp.item_page(items, order=order, limit=limit, after=after))

    @router.post("/v1/responses/{response_id}/cancel", summary="Cancel a background response (there are none)",
                 response_model=rp.Response)
    async def cancel_response(response_id: str):
        await stored(response_id)
        # OpenAI cancels only responses created with background: true, which qwenkit refuses.
        raise APIError(400, f"response {response_id!r} was not created with background: true; only background "
                            "responses can be cancelled (this server generates every response while its request "
                            "waits: close the request to stop it)", param="response_id")

    router.include_router(conversations_router(store))
    return router
