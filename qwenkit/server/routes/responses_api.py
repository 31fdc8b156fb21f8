"""OpenAI's Responses API: ``POST /v1/responses`` and stored responses, which a later
request continues with ``previous_response_id``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from qwenkit.server import responses_protocol as rp
from qwenkit.server.errors import APIError
from qwenkit.server.limits import prompt_texts
from qwenkit.server.respond import respond
from qwenkit.server.response_store import ResponseStore
from qwenkit.server.routes.context import ServerContext, as_400

_STREAM = {200: {"content": {"text/event-stream": {
    "description": "with stream: true, typed events (response.created ... response.completed)"}}}}


def responses_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()
    store = ResponseStore(ctx.config.responses_db)

    @router.post("/v1/responses", summary="OpenAI Responses", response_model=rp.Response, responses=_STREAM)
    async def create_response(body: rp.ResponsesRequest, request: Request):
        model = ctx.check_model(body.model)
        previous = None
        if body.previous_response_id:
            previous = await asyncio.to_thread(store.conversation, body.previous_response_id)
            if previous is None:
                raise APIError(404, f"previous_response_id {body.previous_response_id!r} is not a stored response",
                               param="previous_response_id", code="previous_response_not_found")
        call = as_400(rp.responses_call, body, previous)
        await ctx.check_prompt(prompt_texts(call.request.messages))
        builder = rp.ResponseBuilder(rp.new_id("resp"), model, body)
        chunks = await ctx.open_chat(call.request, builder.id)

        async def save() -> rp.Response:
            response = builder.final()
            if body.store is not False:
                reply = builder.assistant_message()
                await asyncio.to_thread(store.save, response.model_dump(mode="json", by_alias=True),
                                        call.conversation + ([reply] if reply else []))
            return response

        return await respond(request, chunks, rp.ResponsesAnswer(builder, save), stream=bool(body.stream))

    @router.get("/v1/responses/{response_id}", summary="A stored response", response_model=rp.Response)
    async def get_response(response_id: str):
        response = await asyncio.to_thread(store.response, response_id)
        if response is None:
            raise APIError(404, f"no stored response {response_id!r}", param="response_id", code="not_found")
        return response

    return router
