"""DashScope's text generation and multimodal conversation (what the `dashscope` SDK's
`Generation.call` and `MultiModalConversation.call` post)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from qwenkit.server import dashscope_protocol as ds
from qwenkit.server.limits import prompt_texts
from qwenkit.server.respond import respond
from qwenkit.server.routes.context import ServerContext, as_400
from qwenkit.server.watch import request_id_of

DASHSCOPE_ROUTE = "/api/v1/services/aigc/text-generation/generation"
MULTIMODAL_ROUTE = "/api/v1/services/aigc/multimodal-generation/generation"


def dashscope_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    async def answer(body: ds.GenerationRequest, request: Request, *, multimodal: bool):
        request_id = request_id_of(request)  # errors answered on this path carry it too
        ctx.check_model(body.model)
        call = as_400(lambda: ds.generation_call(body, multimodal=multimodal))
        await ctx.check_prompt(prompt_texts(call.request.messages))
        chunks = await ctx.open_chat(call.request, request_id)
        # The multimodal route answers in messages whose content is a list of parts.
        encoder = ds.GenerationEncoder(request_id, "message" if multimodal else call.result_format,
                                       call.incremental_output, content_parts=multimodal,
                                       decode=ctx.token_decoder(call.request.sampling_params.logprobs))
        stream = request.headers.get("x-dashscope-sse", "").lower() == "enable" or bool(body.parameters.stream)
        return await respond(request, chunks, ds.GenerationAnswer(encoder), stream=stream)

    @router.post(DASHSCOPE_ROUTE, summary="DashScope text generation")
    async def generation(body: ds.GenerationRequest, request: Request):
        return await answer(body, request, multimodal=False)

    @router.post(MULTIMODAL_ROUTE, summary="DashScope multimodal conversation (images in, text out)")
    async def multimodal_generation(body: ds.GenerationRequest, request: Request):
        return await answer(body, request, multimodal=True)

    return router
