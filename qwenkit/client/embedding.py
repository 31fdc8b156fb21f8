"""Embedding models and rerankers for retrieval: the local engine's, or a server's.

`EmbeddingModel.embed` embeds documents as they are and `embed_query` a query under
Qwen3-Embedding's instruction (``Instruct: {task}\\nQuery:{query}``, written here, so any
server of the model gets it: qwenkit's, vLLM's). The remote classes speak OpenAI's
``/v1/embeddings`` and the common ``/v1/rerank``; the local ones load the model in this
process (and torch with it, on first use only).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import httpx

__all__ = ["EmbeddingModel", "LocalEmbeddingModel", "LocalReranker", "OpenAIEmbeddingModel", "OpenAIReranker",
           "QUERY_INSTRUCTION", "Reranker", "format_query"]

# Qwen3-Embedding's default retrieval task (qwenkit.embedding.DEFAULT_QUERY_TASK; the client imports no torch).
QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def format_query(query: str, instruction: str | None = QUERY_INSTRUCTION) -> str:
    return query if instruction is None else f"Instruct: {instruction}\nQuery:{query}"


class EmbeddingModel(ABC):
    """Texts to vectors. `query_instruction`: the task a query is embedded under (None: as is)."""

    query_instruction: str | None = QUERY_INSTRUCTION

    @abstractmethod
    def embed(self, texts: list[str]) -> list[list[float]]:
        """One vector per text (documents: no instruction)."""

    def embed_query(self, query: str) -> list[float]:
        return self.embed([format_query(query, self.query_instruction)])[0]


class Reranker(ABC):
    @abstractmethod
    def score(self, query: str, documents: list[str]) -> list[float]:
        """Relevance of each document to `query` (higher is more relevant), in order."""


def _local_llm(model: Any, llm_kwargs: dict[str, Any]):
    if isinstance(model, str) or model is None:
        from qwenkit.llm import LLM

        return LLM(model, **llm_kwargs)
    return model


class LocalEmbeddingModel(EmbeddingModel):
    """An embedding model (Qwen3-Embedding) loaded in this process: `model` is what `LLM`
    takes, or a loaded `LLM`. dimensions: keep the first d values (Matryoshka)."""

    def __init__(self, model: Any, *, dimensions: int | None = None,
                 query_instruction: str | None = QUERY_INSTRUCTION, **llm_kwargs: Any):
        self.llm = _local_llm(model, llm_kwargs)
        self.dimensions = dimensions
        self.query_instruction = query_instruction

    def embed(self, texts: list[str]) -> list[list[float]]:
        return self.llm.embed(list(texts), dimensions=self.dimensions) if texts else []


class LocalReranker(Reranker):
    """A reranker (Qwen3-Reranker) loaded in this process."""

    def __init__(self, model: Any, *, instruction: str | None = None, **llm_kwargs: Any):
        self.llm = _local_llm(model, llm_kwargs)
        self.instruction = instruction

    def score(self, query: str, documents: list[str]) -> list[float]:
        return self.llm.score(query, list(documents), instruction=self.instruction) if documents else []


class _Remote:
    def __init__(self, base_url: str, model: str, api_key: str | None, timeout: float):
        self.base_url = base_url.rstrip("/")
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=timeout)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(self.base_url + path, json=body)
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise RuntimeError(f"{self.base_url}{path} answered {response.status_code}: {message}")
        return response.json()


class OpenAIEmbeddingModel(_Remote, EmbeddingModel):
    """An OpenAI-compatible ``/v1/embeddings`` (base_url ends in ``/v1``)."""

    def __init__(self, base_url: str, model: str = "default", api_key: str | None = None, *,
                 dimensions: int | None = None, query_instruction: str | None = QUERY_INSTRUCTION,
                 batch_size: int = 64, timeout: float = 120.0):
        super().__init__(base_url, model, api_key, timeout)
        self.dimensions = dimensions
        self.query_instruction = query_instruction
        self.batch_size = batch_size

    def embed(self, texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            body: dict[str, Any] = {"model": self.model, "input": list(texts[start:start + self.batch_size]),
                                    "encoding_format": "float"}
            if self.dimensions is not None:
                body["dimensions"] = self.dimensions
            data = self._post("/embeddings", body)["data"]
            vectors += [d["embedding"] for d in sorted(data, key=lambda d: d["index"])]
        return vectors


class OpenAIReranker(_Remote, Reranker):
    """A ``/v1/rerank`` in the Cohere / Jina / vLLM shape (base_url ends in ``/v1``)."""

    def __init__(self, base_url: str, model: str = "default", api_key: str | None = None, *, timeout: float = 120.0):
        super().__init__(base_url, model, api_key, timeout)

    def score(self, query: str, documents: list[str]) -> list[float]:
        if not documents:
            return []
        results = self._post("/rerank", {"model": self.model, "query": query, "documents": list(documents),
                                         "return_documents": False})["results"]
        scores = [0.0] * len(documents)
        for r in results:
            scores[r["index"]] = r["relevance_score"]
        return scores
