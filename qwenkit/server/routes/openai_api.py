"""OpenAI's chat completions, (legacy) completions and models, also on DashScope's
OpenAI-compatible paths (``/compatible-mode/v1/...``)."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request

from qwenkit.server import openai_protocol as oa
from qwenkit.server.limits import prompt_texts
from qwenkit.server.respond import respond
from qwenkit.server.routes.context import ServerContext, as_400
from qwenkit.server.watch import name_request


def openai_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    async def chat_completions(body: oa.ChatCompletionRequest, request: Request):
        model = ctx.check_model(body.model)
        call = as_400(oa.chat_call, body)
        await ctx.check_prompt(prompt_texts(call.request.messages))
        request_id = name_request(request, "chatcmpl-" + secrets.token_hex(12))
        chunks = await ctx.open_chat(call.request, request_id)
        decode = ctx.token_decoder(call.request.sampling_params.logprobs)
        answer = oa.ChatAnswer(request_id, model, include_usage=call.include_usage, decode=decode,
                               functions=call.functions)
        return await respond(request, chunks, answer, stream=bool(body.stream))

    router.post("/v1/chat/completions", summary="OpenAI chat completions")(chat_completions)
    router.post("/compatible-mode/v1/chat/completions", summary="DashScope's OpenAI-compatible chat")(chat_completions)

    @router.post("/v1/completions", summary="OpenAI (legacy) text completions")
    async def completions(body: oa.CompletionRequest, request: Request):
        model = ctx.check_model(body.model)
        call = as_400(oa.completion_call, body)
        if isinstance(call.prompt, str):
            await ctx.check_prompt([call.prompt])
        prompt_ids = call.prompt if isinstance(call.prompt, list) else as_400(ctx.allm.tokenizer.encode, call.prompt)
        request_id = name_request(request, "cmpl-" + secrets.token_hex(12))
        decode = ctx.token_decoder(call.params.logprobs)
        encoder = oa.CompletionEncoder(request_id, model, decode, call.include_usage)

        def count_tokens() -> None:
            ctx.metrics.tokens(prompt=encoder.num_prompt_tokens, generated=encoder.num_generated,
                               cached=encoder.num_cached_tokens)

        updates = await ctx.open_completion(prompt_ids, call.params, request_id, on_close=count_tokens)
        return await respond(request, updates, oa.CompletionAnswer(encoder), stream=bool(body.stream))

    async def models() -> oa.ModelList:
        return oa.models_response(ctx.listed, served=ctx.names[0], max_model_len=ctx.allm.llm.max_model_len,
                                  created=ctx.started, capabilities=ctx.capabilities)

    router.get("/v1/models", summary="The served models")(models)
    router.get("/compatible-mode/v1/models", summary="The served models (DashScope path)")(models)

    async def model(model_id: str) -> oa.ModelCard:
        ctx.check_model(model_id)
        return oa.model_card(model_id, served=ctx.names[0], max_model_len=ctx.allm.llm.max_model_len,
                             created=ctx.started, capabilities=ctx.capabilities)

    router.get("/v1/models/{model_id}", summary="One served model")(model)
    router.get("/compatible-mode/v1/models/{model_id}", summary="One served model (DashScope path)")(model)
    return router
