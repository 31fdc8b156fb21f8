"""`RetrievalAdvisor`: answer from documents (Spring AI's `QuestionAnswerAdvisor`).

Before the model runs, the user's question is searched in a `VectorStore` (hybrid: BM25
fused with vectors when the store embeds, BM25 alone when it does not), optionally
reranked, and the documents found are added to the user message under Spring AI's
context template. The answer carries them: ``response.metadata["qa_retrieved_documents"]``
(`RETRIEVED_DOCUMENTS`), as Spring AI names them, and `sources(response)` lists where
they came from.

    store = VectorStore(":memory:")
    store.add(read_documents("docs/"))
    client = ChatClient(model, default_advisors=[RetrievalAdvisor(store)])
    response = client.prompt("How do I ...?").call().chat_response()
    print(response.content, sources(response))
"""

from __future__ import annotations

from typing import Any

from qwenkit.client.advisors import AdvisedRequest, Advisor
from qwenkit.client.documents import Document
from qwenkit.client.embedding import Reranker
from qwenkit.client.types import ChatResponse
from qwenkit.client.vector_store import VectorStore

__all__ = ["RETRIEVED_DOCUMENTS", "RetrievalAdvisor", "index_folder", "sources"]

RETRIEVED_DOCUMENTS = "qa_retrieved_documents"
_ADVISED = "qwenkit_retrieval_advised_message"


def sources(response: ChatResponse) -> list[str]:
    """Where the documents an answer used came from (their ``source`` metadata, else id), in
    retrieval order, each once."""
    seen: dict[str, None] = {}
    for doc in response.metadata.get(RETRIEVED_DOCUMENTS, []):
        seen.setdefault(str(doc.metadata.get("source", doc.id)), None)
    return list(seen)


def index_folder(store: VectorStore, folder: str, *, chunk_size: int = 1000, chunk_overlap: int = 150) -> int:
    """Read a folder's text, Markdown and PDF files into `store`, replacing what it held from
    them (chunks are keyed by path and number); returns how many chunks it holds now."""
    from qwenkit.client.documents import read_documents

    documents = read_documents(folder, chunk_size=chunk_size, chunk_overlap=chunk_overlap)
    store.delete(where={"source": sorted({d.metadata["source"] for d in documents})})
    store.add(documents)
    return len(documents)


class RetrievalAdvisor(Advisor):
    """Retrieve `top_k` documents for the user's question and put them in the prompt.

    reranker: first retrieve `candidates` documents (default 4 x top_k), keep the top_k it
    scores highest. where: a metadata filter for the search (``request.context["where"]``
    overrides it per request). min_score: drop documents scored below it (search scores:
    fused, BM25 or cosine; the reranker's when there is one). user_text_advise: the
    template, with ``{query}`` and ``{question_answer_context}``."""

    DEFAULT_USER_TEXT_ADVISE = (
        "{query}\n\n"
        "Context information is below, surrounded by ---------------------\n\n"
        "---------------------\n"
        "{question_answer_context}\n"
        "---------------------\n\n"
        "Given the context and provided history information and not prior knowledge,\n"
        "reply to the user comment. If the answer is not in the context, inform\n"
        "the user that you can't answer the question.\n"
    )
    order = 0  # after the memory advisors: the question is this turn's own message

    def __init__(self, store: VectorStore, *, top_k: int = 4, reranker: Reranker | None = None,
                 candidates: int | None = None, where: dict[str, Any] | None = None, min_score: float | None = None,
                 user_text_advise: str | None = None):
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        self.store = store
        self.top_k = top_k
        self.reranker = reranker
        self.candidates = candidates or 4 * top_k
        self.where = where
        self.min_score = min_score
        self.user_text_advise = user_text_advise or self.DEFAULT_USER_TEXT_ADVISE

    def retrieve(self, query: str, where: dict[str, Any] | None = None) -> list[Document]:
        """The documents the advisor would add for `query`."""
        if self.reranker is None:
            docs = self.store.search(query, self.top_k, where=where)
        else:
            docs = self.store.search(query, self.candidates, where=where)
            scores = self.reranker.score(query, [d.text for d in docs])
            for doc, s in zip(docs, scores):
                doc.score = s
            docs = sorted(docs, key=lambda d: -(d.score or 0.0))[: self.top_k]
        if self.min_score is not None:
            docs = [d for d in docs if d.score is not None and d.score >= self.min_score]
        return docs

    def before(self, request: AdvisedRequest) -> AdvisedRequest:
        query = request.user_text()
        docs = self.retrieve(query, request.context.get("where", self.where)) if query.strip() else []
        request.context[RETRIEVED_DOCUMENTS] = docs
        context = "\n\n".join(_cite(d) for d in docs)
        for i in range(len(request.messages) - 1, -1, -1):
            message = request.messages[i]
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                advised = self.user_text_advise.format(query=message["content"], question_answer_context=context)
                request.messages[i] = {**message, "content": advised}
                request.context[_ADVISED] = (i, message)
                break
        return request

    def after(self, request: AdvisedRequest, response: ChatResponse) -> ChatResponse:
        response.metadata[RETRIEVED_DOCUMENTS] = request.context.get(RETRIEVED_DOCUMENTS, [])
        if _ADVISED in request.context:  # a memory advisor (outside this one) stores the question as asked
            i, message = request.context.pop(_ADVISED)
            request.messages[i] = message
        return response


def _cite(doc: Document) -> str:
    source = doc.metadata.get("source")
    return f"[{source}]\n{doc.text}" if source else doc.text
