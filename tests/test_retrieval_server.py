"""/v1/embeddings, DashScope text embedding and /v1/rerank on a real loopback server, called
by the openai SDK, the dashscope SDK, LangChain's OpenAIEmbeddings and plain httpx; the
answers equal `LLM.embed` / `LLM.score` on the same checkpoint."""

import base64

import httpx
import numpy as np
import pytest
from tiny_retrieval import make_retrieval_checkpoint

from qwenkit import LLM, AsyncLLM
from qwenkit.embedding import DEFAULT_QUERY_TASK

TEXTS = ["Hello world!", "def add(a, b): return a + b", "The quick brown fox jumps over the lazy dog."]


def serve(folder):
    from serving import running_server

    from qwenkit.server import ServerConfig

    allm = AsyncLLM(str(folder), dtype="float32", kv_cache_dtype="float32", progress=False)
    return allm, running_server(allm, ServerConfig(served_model_names=["tiny"]))


def _served(tmp_path_factory, kind: str):
    """A server of a tiny `kind` checkpoint, and an LLM of the same folder to compare with."""
    # Named as Qwen publishes them: a reranker's name is what marks it (qwenkit.capabilities).
    folder = tmp_path_factory.mktemp("checkpoints") / f"Qwen3-{kind.capitalize()}-tiny"
    make_retrieval_checkpoint(folder, kind)
    allm, server = serve(folder)
    with server as url:
        yield url, LLM(str(folder), dtype="float32", kv_cache_dtype="float32", progress=False)
    allm.shutdown()


@pytest.fixture(scope="module")
def embedding_server(tmp_path_factory):
    yield from _served(tmp_path_factory, "embedding")


@pytest.fixture(scope="module")
def rerank_server(tmp_path_factory):
    yield from _served(tmp_path_factory, "reranker")


def close(a, b, tol=1e-6):
    return np.abs(np.asarray(a) - np.asarray(b)).max() <= tol


def test_openai_sdk_embeddings_float_and_base64(embedding_server):
    import openai

    url, llm = embedding_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    expected = llm.embed(TEXTS)
    as_float = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    assert [d.index for d in as_float.data] == [0, 1, 2]
    assert close([d.embedding for d in as_float.data], expected)
    as_b64 = client.embeddings.create(model="tiny", input=TEXTS)  # the SDK asks for base64 and decodes it
    assert close([d.embedding for d in as_b64.data], expected)
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens == sum(
        len(llm.tokenizer.encode(t)) + 1 for t in TEXTS)
    assert as_float.model == "tiny"
    one = client.embeddings.create(model="tiny", input=TEXTS[0], dimensions=8, encoding_format="float")
    assert close(one.data[0].embedding, llm.embed(TEXTS[0], dimensions=8)[0])
    ids = [llm.tokenizer.encode(t) for t in TEXTS[:2]]
    by_ids = client.embeddings.create(model="tiny", input=ids, encoding_format="float")
    assert close([d.embedding for d in by_ids.data], expected[:2])
    query = client.embeddings.create(model="tiny", input="the fox", encoding_format="float",
                                     extra_body={"instruction": "Find the animal"})
    assert close(query.data[0].embedding, llm.embed("the fox", instruction="Find the animal")[0])


def test_base64_is_little_endian_float32(embedding_server):
    url, llm = embedding_server
    body = httpx.post(url + "/v1/embeddings", json={"input": "Hello", "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert close(vector, llm.embed("Hello")[0])


def test_langchain_openai_embeddings_with_an_in_memory_store(embedding_server):
    from langchain_core.vectorstores import InMemoryVectorStore
    from langchain_openai import OpenAIEmbeddings

    url, llm = embedding_server
    # check_embedding_ctx_length=False: no tiktoken (it would download its vocabulary).
    emb = OpenAIEmbeddings(model="tiny", base_url=url + "/v1", api_key="none", check_embedding_ctx_length=False)
    store = InMemoryVectorStore.from_texts(TEXTS, emb)
    assert close(emb.embed_query(TEXTS[1]), llm.embed(TEXTS[1])[0])
    for text in TEXTS:
        assert store.similarity_search(text, k=1)[0].page_content == text


def test_dashscope_text_embedding(embedding_server):
    import dashscope

    url, llm = embedding_server
    dashscope.base_http_api_url = url + "/api/v1"
    response = dashscope.TextEmbedding.call(model="tiny", input=TEXTS, api_key="none", dimension=16,
                                            text_type="query")
    assert response.status_code == 200, response
    vectors = [e["embedding"] for e in sorted(response.output["embeddings"], key=lambda e: e["text_index"])]
    assert close(vectors, llm.embed(TEXTS, dimensions=16, instruction=DEFAULT_QUERY_TASK))
    assert response.usage["total_tokens"] > 0
    bad = httpx.post(url + "/api/v1/services/embeddings/text-embedding/text-embedding",
                     json={"model": "tiny", "input": {"texts": []}}).json()
    assert bad["code"] == "InvalidParameter" and "input.texts must not be empty" in bad["message"]


@pytest.mark.parametrize("body, fragment", [
    ({"input": []}, "input must not be empty"),
    ({"input": ["a", ""]}, "input[1] is empty"),
    ({"input": "a", "dimensions": 65}, "dimensions must be between 1 and 64"),
    ({"input": "a", "dimensions": 0}, "dimensions"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": ["a", 1]}, "input"),
    ({"input": [[10**6]]}, "token ids must be in"),
    ({"input": "a", "model": "other"}, "does not exist"),
])
def test_bad_embedding_requests_are_400s(embedding_server, body, fragment):
    r = httpx.post(embedding_server[0] + "/v1/embeddings", json=body)
    assert r.status_code == (404 if "model" in body else 400), r.text
    assert fragment in r.json()["error"]["message"]


def test_embedding_model_refuses_chat_and_rerank_and_lists_its_capability(embedding_server):
    url = embedding_server[0]
    chat = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and "embedding model and cannot generate" in chat.json()["error"]["message"]
    rerank = httpx.post(url + "/v1/rerank", json={"query": "q", "documents": ["d"]})
    assert rerank.status_code == 400 and "cannot rerank" in rerank.json()["error"]["message"]
    models = httpx.get(url + "/v1/models").json()
    assert models["data"][0]["capabilities"] == ["embedding"]


def test_chat_model_refuses_to_embed(server):
    r = httpx.post(server + "/v1/embeddings", json={"input": "hello"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "model" and "cannot embed" in r.json()["error"]["message"]


def test_rerank_in_the_common_shape(rerank_server):
    url, llm = rerank_server
    docs = ["Hello world!", "def add(a, b): return a + b", "The quick brown fox jumps over the lazy dog.", "1234"]
    expected = llm.score("the fox", docs)
    order = sorted(range(4), key=lambda i: -expected[i])
    for path in ("/v1/rerank", "/rerank"):
        body = httpx.post(url + path, json={"model": "tiny", "query": "the fox", "documents": docs}).json()
        assert [r["index"] for r in body["results"]] == order
        assert close([r["relevance_score"] for r in body["results"]], [expected[i] for i in order])
        assert [r["document"]["text"] for r in body["results"]] == [docs[i] for i in order]
        assert body["usage"]["total_tokens"] > 0 and body["model"] == "tiny"
    top = httpx.post(url + "/v1/rerank", json={"query": "the fox", "documents": [{"text": d} for d in docs],
                                               "top_n": 2, "return_documents": False}).json()
    assert [r["index"] for r in top["results"]] == order[:2]
    assert "document" not in top["results"][0]
    for bad, fragment in [({"query": "q", "documents": []}, "documents must not be empty"),
                          ({"query": "q", "documents": ["d"], "top_n": 0}, "top_n"),
                          ({"documents": ["d"]}, "query")]:
        r = httpx.post(url + "/v1/rerank", json=bad)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def test_reranker_lists_rerank(rerank_server):
    assert "rerank" in httpx.get(rerank_server[0] + "/v1/models").json()["data"][0]["capabilities"]


def test_client_remote_embedding_model_and_reranker(embedding_server, rerank_server):
    from qwenkit.client import OpenAIEmbeddingModel, OpenAIReranker, VectorStore
    from qwenkit.client.embedding import format_query

    url, llm = embedding_server
    remote = OpenAIEmbeddingModel(url + "/v1", "tiny", batch_size=2)
    assert close(remote.embed(TEXTS), llm.embed(TEXTS))
    assert close(remote.embed_query("fox"), llm.embed(format_query("fox"))[0])
    store = VectorStore(":memory:", embedding_model=remote)
    store.add(TEXTS)
    assert store.similarity_search(TEXTS[2], k=1)[0].text == TEXTS[2]
    url, llm = rerank_server
    assert close(OpenAIReranker(url + "/v1", "tiny").score("fox", TEXTS), llm.score("fox", TEXTS))
    with pytest.raises(RuntimeError, match="answered 400: the model `tiny` is an embedding model"):
        OpenAIReranker(embedding_server[0] + "/v1").score("fox", TEXTS)
