"""Embeddings and rerank requests, translated to and from `qwenkit.embedding` calls.

Pure functions, no I/O, as the other protocol modules:

* OpenAI ``/v1/embeddings``: ``input`` a string, a list of strings, a list of token ids
  or a list of such lists; ``encoding_format`` "float" or "base64" (little-endian
  float32, what the openai SDK decodes); ``dimensions`` (Matryoshka truncation); usage.
  ``instruction`` (qwenkit's, as the SDKs' ``extra_body``) embeds the inputs as queries.
* DashScope text embedding (what the `dashscope` SDK's ``TextEmbedding.call`` posts):
  ``input.texts``, ``parameters.dimension`` and ``parameters.text_type`` ("query" gets
  Qwen3-Embedding's query instruction, "document" none).
* Rerank (``/v1/rerank``, ``/rerank``), in the shape Cohere, Jina and vLLM share: query,
  documents (strings, or objects with ``text``), ``top_n``, ``return_documents``; results
  sorted by ``relevance_score``, each with its ``index`` in the request.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qwenkit.embedding import DEFAULT_QUERY_TASK

MAX_INPUTS = 2048  # OpenAI's own limit on a request's inputs


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class EmbeddingRequest(_Model):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    instruction: str | None = None
    user: str | None = None


class DashScopeEmbeddingInput(_Model):
    texts: str | list[str]


class DashScopeEmbeddingParameters(_Model):
    dimension: int | None = Field(default=None, ge=1)
    text_type: Literal["query", "document"] = "document"
    instruct: str | None = None
    output_type: Literal["dense"] = "dense"


class DashScopeEmbeddingRequest(_Model):
    model: str | None = None
    input: DashScopeEmbeddingInput
    parameters: DashScopeEmbeddingParameters = DashScopeEmbeddingParameters()


class RerankDocument(_Model):
    text: str


class RerankRequest(_Model):
    query: str
    documents: list[str | RerankDocument]
    model: str | None = None
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = True
    instruction: str | None = None


@dataclass(frozen=True)
class EmbeddingCall:
    """What `qwenkit.embedding.embed` is called with."""

    inputs: list[str] | list[list[int]]
    instruction: str | None
    dimensions: int | None


def embedding_call(body: EmbeddingRequest) -> EmbeddingCall:
    """The call of an OpenAI request; ValueError (a 400 naming the field) for empty input."""
    inputs = body.input
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    _check_inputs(inputs, "input")
    return EmbeddingCall(list(inputs), body.instruction, body.dimensions)


def dashscope_embedding_call(body: DashScopeEmbeddingRequest) -> EmbeddingCall:
    texts = [body.input.texts] if isinstance(body.input.texts, str) else body.input.texts
    _check_inputs(texts, "input.texts")
    p = body.parameters
    instruction = (p.instruct or DEFAULT_QUERY_TASK) if p.text_type == "query" else None
    return EmbeddingCall(texts, instruction, p.dimension)


def _check_inputs(inputs: list, field: str) -> None:
    if not inputs:
        raise ValueError(f"{field} must not be empty")
    if len(inputs) > MAX_INPUTS:
        raise ValueError(f"{field} holds {len(inputs)} inputs; at most {MAX_INPUTS} a request")
    for i, item in enumerate(inputs):
        if len(item) == 0:
            raise ValueError(f"{field}[{i}] is empty")


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    """A vector as OpenAI writes it: a list of floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def embedding_response(vectors: list[list[float]], *, model: str, num_tokens: int,
                       encoding_format: str = "float") -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode_embedding(v, encoding_format)}
                 for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
    }


def dashscope_embedding_response(vectors: list[list[float]], *, request_id: str, num_tokens: int) -> dict[str, Any]:
    return {
        "output": {"embeddings": [{"text_index": i, "embedding": v} for i, v in enumerate(vectors)]},
        "usage": {"total_tokens": num_tokens},
        "request_id": request_id,
    }


def rerank_documents(body: RerankRequest) -> list[str]:
    if not body.documents:
        raise ValueError("documents must not be empty")
    if len(body.documents) > MAX_INPUTS:
        raise ValueError(f"documents holds {len(body.documents)} documents; at most {MAX_INPUTS} a request")
    return [d if isinstance(d, str) else d.text for d in body.documents]


def rerank_response(scores: list[float], documents: list[str], *, request_id: str, model: str, num_tokens: int,
                    top_n: int | None = None, return_documents: bool = True) -> dict[str, Any]:
    """Results by descending relevance (ties in request order), the first top_n."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:top_n]
    results = []
    for i in order:
        result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if return_documents:
            result["document"] = {"text": documents[i]}
        results.append(result)
    return {"id": request_id, "model": model, "results": results,
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}}
