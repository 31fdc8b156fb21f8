"""qwenkit.client retrieval: reading and splitting documents, the SQLite + sqlite-vec store
(persistent, filtered, deletes), BM25, hybrid fusion, the reranker and `RetrievalAdvisor`."""

import numpy as np
import pytest
from tiny_retrieval import make_retrieval_checkpoint

from qwenkit.client import (
    ChatClient, ChatModel, ChatResponse, Document, InMemoryChatMemory, LocalEmbeddingModel, LocalReranker,
    MessageChatMemoryAdvisor, RetrievalAdvisor, VectorStore, index_folder, read_documents, reciprocal_rank_fusion,
    sources, split_markdown, split_text,
)
from qwenkit.client.embedding import QUERY_INSTRUCTION, format_query
from qwenkit.client.retrieval import RETRIEVED_DOCUMENTS

CORPUS = {
    "fox.md": "# Foxes\nThe quick brown fox jumps over the lazy dog.\n\n## Food\nFoxes eat berries and mice.",
    "code.txt": "def add(a, b):\n    return a + b\n\nPython functions return values.",
    "world.md": "# Hello\nHello world! Qwen3 thinks before it answers.",
}


@pytest.fixture(scope="module")
def embedding_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embedding")
    make_retrieval_checkpoint(folder, "embedding")
    return LocalEmbeddingModel(str(folder), dtype="float32", kv_cache_dtype="float32", progress=False)


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints") / "Qwen3-Reranker-tiny"  # named as Qwen publishes it
    make_retrieval_checkpoint(folder, "reranker")
    return LocalReranker(str(folder), dtype="float32", kv_cache_dtype="float32", progress=False)


@pytest.fixture
def folder(tmp_path):
    for name, text in CORPUS.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_split_text_respects_size_and_overlaps():
    text = " ".join(f"Sentence number {i} is here." for i in range(200))
    chunks = split_text(text, chunk_size=200, chunk_overlap=50)
    assert all(len(c) <= 200 for c in chunks) and len(chunks) > 10
    for a, b in zip(chunks, chunks[1:]):
        assert b.split(".")[0] + "." in a  # each chunk starts with the previous one's last sentence
    assert " ".join(chunks).count("Sentence number 199 is here.") >= 1
    assert split_text("word " * 500, chunk_size=100, chunk_overlap=0)[0] == ("word " * 20).strip()
    with pytest.raises(ValueError, match="chunk_overlap"):
        split_text("x", chunk_size=10, chunk_overlap=10)


def test_split_markdown_keeps_headings():
    pairs = split_markdown(CORPUS["fox.md"], chunk_size=200, chunk_overlap=20)
    assert [h for h, _ in pairs] == ["Foxes", "Food"]
    assert pairs[1][1] == "# Food\nFoxes eat berries and mice."


def _pdf(text: str) -> bytes:
    """A one-page PDF showing `text` (written by hand: pypdf reads PDFs, it does not typeset)."""
    stream = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_read_documents_from_text_markdown_and_pdf(folder):
    (folder / "sub").mkdir()
    (folder / "sub" / "paper.pdf").write_bytes(_pdf("Foxes live in dens."))
    (folder / "image.png").write_bytes(b"\x89PNG")  # not read
    docs = read_documents(folder, chunk_size=200, chunk_overlap=20)
    assert [d.id for d in docs] == ["code.txt#0", "fox.md#0", "fox.md#1", "sub/paper.pdf#0", "world.md#0"]
    pdf = docs[3]
    assert pdf.text.strip() == "Foxes live in dens." and pdf.metadata == {"source": "sub/paper.pdf", "chunk": 0, "page": 1}
    assert docs[2].metadata == {"source": "fox.md", "chunk": 1, "heading": "Food"}
    assert read_documents(folder / "world.md")[0].metadata["source"] == "world.md"
    with pytest.raises(FileNotFoundError):
        read_documents(folder / "missing")


def test_store_persists_under_qwenkit_home_filters_and_deletes(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("QWENKIT_HOME", str(tmp_path / "home"))
    store = VectorStore()
    assert store.path == str(tmp_path / "home" / "vectors.sqlite3")
    assert index_folder(store, str(folder), chunk_size=200, chunk_overlap=20) == 4
    store.add([Document("Berries grow on bushes.", {"source": "extra", "n": 3, "ok": True}, id="x")])
    store.close()
    store = VectorStore()  # reopened: the same file
    assert store.count() == 5
    assert store.count(where={"source": "fox.md"}) == 2
    assert store.count(where={"source": ["fox.md", "code.txt"]}) == 3
    assert [d.id for d in store.get(where={"n": 3, "ok": True})] == ["x"]
    assert VectorStore(collection="other").count() == 0
    assert store.keyword_search("berries")[0].id in ("fox.md#1", "x")
    assert [d.id for d in store.keyword_search("berries", where={"source": "extra"})] == ["x"]
    assert store.keyword_search("zebra") == []
    assert store.delete(["x"]) == 1
    assert store.delete(where={"source": "fox.md"}) == 2
    assert store.count() == 2 and [d.id for d in store.keyword_search("berries")] == []
    assert index_folder(store, str(folder), chunk_size=200, chunk_overlap=20) == 4  # replaced, not doubled
    assert store.count() == 4
    with pytest.raises(ValueError, match="metadata key"):
        store.count(where={"a'b": 1})
    with pytest.raises(ValueError, match="needs ids or where"):
        store.delete()
    with pytest.raises(ValueError, match="needs an embedding model"):
        store.similarity_search("fox")


def test_bm25_matches_bm25s_directly(folder):
    import bm25s

    store = VectorStore(":memory:")
    docs = read_documents(folder, chunk_size=200, chunk_overlap=20)
    store.add(docs)
    index = bm25s.BM25()
    index.index(bm25s.tokenize([d.text for d in docs], stopwords="en", show_progress=False), show_progress=False)
    ids, scores = index.retrieve(bm25s.tokenize(["fox berries"], stopwords="en", show_progress=False), k=2,
                                 show_progress=False)
    got = store.keyword_search("fox berries", k=2)
    assert [d.id for d in got] == [docs[i].id for i in ids[0]]
    assert np.allclose([d.score for d in got], scores[0])


def test_vector_search_is_cosine_of_the_model_and_hybrid_is_rrf(folder, embedding_model):
    store = VectorStore(":memory:", embedding_model=embedding_model)
    docs = read_documents(folder, chunk_size=200, chunk_overlap=20)
    store.add(docs)
    vectors = np.array(embedding_model.llm.embed([d.text for d in docs]))
    query = np.array(embedding_model.llm.embed(format_query("the fox", QUERY_INSTRUCTION))[0])
    cosine = vectors @ query
    got = store.similarity_search("the fox", k=4)
    assert [d.id for d in got] == [docs[i].id for i in np.argsort(-cosine)[:4]]
    assert np.allclose([d.score for d in got], np.sort(cosine)[::-1][:4], atol=1e-5)
    assert [d.id for d in store.similarity_search("the fox", k=4, where={"source": "fox.md"})] == [
        d.id for d in got if d.metadata["source"] == "fox.md"]
    lexical = [d.id for d in store.keyword_search("the fox", 8)]
    semantic = [d.id for d in store.similarity_search("the fox", 8)]
    fused = store.search("the fox", k=3)
    assert [(d.id, pytest.approx(d.score)) for d in fused] == reciprocal_rank_fusion(semantic, lexical)[:3]
    assert reciprocal_rank_fusion(["a", "b"], ["b", "c"]) == [("b", 1 / 62 + 1 / 61), ("a", 1 / 61), ("c", 1 / 62)]


class RecordingModel(ChatModel):
    def __init__(self):
        self.seen = []

    def call(self, messages, options=None, *, tools=None):
        self.seen.append(messages)
        return ChatResponse(content="Foxes eat berries.")


def test_retrieval_advisor_adds_context_and_returns_the_documents(folder):
    store = VectorStore(":memory:")
    index_folder(store, str(folder), chunk_size=200, chunk_overlap=20)
    model, memory = RecordingModel(), InMemoryChatMemory()
    client = ChatClient(model, default_advisors=[MessageChatMemoryAdvisor(memory), RetrievalAdvisor(store, top_k=2)])
    response = client.prompt("What do foxes eat?").call().chat_response()
    used = response.metadata[RETRIEVED_DOCUMENTS]
    assert used[0].id == "fox.md#1" and sources(response)[0] == "fox.md"
    prompt = model.seen[0][-1]["content"]
    assert prompt.startswith("What do foxes eat?\n\nContext information is below")
    assert "[fox.md]\n# Food\nFoxes eat berries and mice." in prompt
    assert memory.get("default")[0]["content"] == "What do foxes eat?"  # stored as asked
    client.prompt("And the dog?").call().content()
    assert [m["content"] for m in model.seen[1][:2]] == ["What do foxes eat?", "Foxes eat berries."]


def test_retrieval_advisor_reranks(folder, reranker):
    store = VectorStore(":memory:")
    index_folder(store, str(folder), chunk_size=200, chunk_overlap=20)
    advisor = RetrievalAdvisor(store, top_k=2, reranker=reranker, candidates=4)
    candidates = store.search("fox berries dog", 4)
    scores = reranker.llm.score("fox berries dog", [d.text for d in candidates])
    expected = [candidates[i].id for i in np.argsort(-np.array(scores), kind="stable")[:2]]
    got = advisor.retrieve("fox berries dog")
    assert [d.id for d in got] == expected
    assert [d.score for d in got] == pytest.approx(sorted(scores, reverse=True)[:2], abs=1e-5)
