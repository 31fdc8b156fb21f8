"""DashScope's text generation (what the `dashscope` SDK's `Generation.call` posts)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from qwenkit.server import dashscope_protocol as ds
from qwenkit.server.limits import prompt_texts
from qwenkit.server.respond import respond
from qwenkit.server.routes.context import ServerContext, as_400
from qwenkit.server.watch import request_id_of

DASHSCOPE_ROUTE = "/api/v1/services/aigc/text-generation/generation"


def dashscope_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    @router.post(DASHSCOPE_ROUTE, summary="DashScope text generation")
    async def generation(body: ds.GenerationRequest, request: Request):
        request_id = request_id_of(request)  # errors answered on this path carry it too
        ctx.check_model(body.model)
        call = as_400(ds.generation_call, body)
        await ctx.check_prompt(prompt_texts(call.request.messages))
        chunks = await ctx.open_chat(call.request, request_id)
        encoder = ds.GenerationEncoder(request_id, call.result_format, call.incremental_output,
                                       decode=ctx.token_decoder(call.request.sampling_params.logprobs))
        stream = request.headers.get("x-dashscope-sse", "").lower() == "enable" or bool(body.parameters.stream)
        return await respond(request, chunks, ds.GenerationAnswer(encoder), stream=stream)

    return router
