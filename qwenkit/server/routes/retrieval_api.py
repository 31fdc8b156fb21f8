"""Embeddings (OpenAI's and DashScope's) and rerank, over the served model's engine.

A model embeds if its checkpoint says it is an embedding model, and reranks if it is
published as a reranker (Qwen3-Reranker) or served with ``--task rerank``
(qwenkit.capabilities): asked for the other, it answers a 400 that says what the model
does. The prompts run on the engine thread between two generation steps (`AsyncLLM.embed`,
`AsyncLLM.score`), in a request slot.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request

from qwenkit import embedding
from qwenkit.capabilities import model_capabilities
from qwenkit.errors import QwenkitError
from qwenkit.server import embeddings_protocol as ep
from qwenkit.server import openai_protocol as oa
from qwenkit.server.errors import APIError, bad_request
from qwenkit.server.routes.context import ServerContext, as_400

DASHSCOPE_EMBEDDING_ROUTE = "/api/v1/services/embeddings/text-embedding/text-embedding"

T = TypeVar("T")


def retrieval_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()
    allm = ctx.allm
    caps = model_capabilities(allm.llm)

    def check_embeds(model: str) -> None:
        if not caps.embedding:
            raise APIError(400, f"the model `{model}` is a chat model and cannot embed: serve an embedding model "
                                "(such as Qwen3-Embedding) for embeddings", param="model", code="model_not_embedding")

    async def in_slot(call: Callable[[], Awaitable[T]]) -> T:
        """call() in a request slot; its ValueError (an input at fault) is a 400."""
        await ctx.slots.acquire()
        try:
            return await call()
        except (ValueError, QwenkitError) as e:
            raise bad_request(e, oa.REQUEST_FIELDS) from e
        finally:
            ctx.slots.release()

    async def embed(call: ep.EmbeddingCall) -> embedding.Embeddings:
        return await in_slot(lambda: allm.embed(call.inputs, instruction=call.instruction,
                                                dimensions=call.dimensions))

    @router.post("/v1/embeddings", summary="OpenAI embeddings")
    async def embeddings(body: ep.EmbeddingRequest) -> dict[str, Any]:
        model = ctx.check_model(body.model)
        check_embeds(model)
        result = await embed(as_400(ep.embedding_call, body))
        return ep.embedding_response(result.tolist(), model=model, num_tokens=result.num_tokens,
                                     encoding_format=body.encoding_format)

    router.post("/compatible-mode/v1/embeddings", summary="OpenAI embeddings (DashScope path)")(embeddings)

    @router.post(DASHSCOPE_EMBEDDING_ROUTE, summary="DashScope text embedding")
    async def dashscope_embeddings(body: ep.DashScopeEmbeddingRequest, request: Request) -> dict[str, Any]:
        request_id = secrets.token_hex(16)
        request.state.request_id = request_id  # errors answered on this path carry it
        check_embeds(ctx.check_model(body.model))
        result = await embed(as_400(ep.dashscope_embedding_call, body))
        return ep.dashscope_embedding_response(result.tolist(), request_id=request_id, num_tokens=result.num_tokens)

    async def rerank(body: ep.RerankRequest) -> dict[str, Any]:
        model = ctx.check_model(body.model)
        if not caps.rerank:
            what = "an embedding model" if caps.embedding else "not a reranker"
            raise APIError(400, f"the model `{model}` is {what} and cannot rerank: serve a reranker "
                                "(such as Qwen3-Reranker, or a model with --task rerank)",
                           param="model", code="model_not_reranker")
        documents = as_400(ep.rerank_documents, body)
        scores = await in_slot(lambda: allm.score(body.query, documents, instruction=body.instruction))
        return ep.rerank_response(scores.data, documents, request_id="rerank-" + secrets.token_hex(12), model=model,
                                  num_tokens=scores.num_tokens, top_n=body.top_n,
                                  return_documents=body.return_documents)

    router.post("/v1/rerank", summary="Rerank documents (Cohere / Jina / vLLM shape)")(rerank)
    router.post("/rerank", summary="Rerank documents (Cohere / Jina / vLLM shape)")(rerank)
    return router
