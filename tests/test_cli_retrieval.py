"""`qwenkit embed`, `qwenkit bench --embed` and `qwenkit chat --docs` on tiny random-weight
checkpoints: the command's embeddings against Qwen3-Embedding's model card in transformers,
one error line for a model that cannot embed, the sources printed after a --docs answer."""

import io
import json

import pytest
import torch
from test_embedding import TEXTS, card_embeddings, hf_tokenizer
from tiny_retrieval import make_retrieval_checkpoint

from qwenkit.cli import _parser, main
from qwenkit.embedding import format_query

FLOAT32 = ["--dtype", "float32", "--kv-cache-dtype", "float32"]


@pytest.fixture(scope="module")
def embedding_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embedding")
    return folder, make_retrieval_checkpoint(folder, "embedding")


def embedded(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_embed_prints_the_model_cards_embeddings(embedding_model, capsys):
    folder, ref = embedding_model
    assert main(["embed", "--model", str(folder), *FLOAT32, *TEXTS[:3]]) == 0
    rows = embedded(capsys)
    assert [r["index"] for r in rows] == [0, 1, 2]
    expected = card_embeddings(ref, hf_tokenizer(folder), TEXTS[:3])
    assert (torch.tensor([r["embedding"] for r in rows]) - expected).abs().max() <= 1e-5


def test_embed_reads_lines_and_applies_the_query_instruction(embedding_model, monkeypatch, capsys):
    folder, ref = embedding_model
    monkeypatch.setattr("sys.stdin", io.StringIO("what is qwen?\n\nfox\n"))
    assert main(["embed", "--model", str(folder), *FLOAT32, "--query", "--dimensions", "16"]) == 0
    rows = embedded(capsys)
    assert len(rows) == 2  # the blank line is not a text
    full = card_embeddings(ref, hf_tokenizer(folder), [format_query("what is qwen?"), format_query("fox")])
    expected = torch.nn.functional.normalize(full[:, :16], dim=1)
    got = torch.tensor([r["embedding"] for r in rows])
    assert got.shape == (2, 16)
    assert (got - expected).abs().max() <= 1e-5
    assert main(["embed", "--model", str(folder), *FLOAT32, "--instruction", "Find code", "def f(): pass"]) == 0
    expected = card_embeddings(ref, hf_tokenizer(folder), [format_query("def f(): pass", "Find code")])
    assert (torch.tensor(embedded(capsys)[0]["embedding"]) - expected[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("argv, fragment", [
    (["--query", "--instruction", "x", "a"], "one choice"),
    (["--dimensions", "0", "a"], "--dimensions must be >= 1"),
])
def test_embed_checks_its_options(embedding_model, argv, fragment, capsys):
    assert main(["embed", "--model", str(embedding_model[0]), *argv]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], errors


def test_a_chat_model_cannot_embed(tiny_checkpoints, capsys):
    assert main(["embed", "--model", str(tiny_checkpoints("qwen3")), "hello"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "not an embedding model" in errors[0], errors


def test_bench_embed_prints_embeddings_a_second(embedding_model, capsys):
    folder, _ = embedding_model
    assert main(["bench", "--embed", "--model", str(folder), "--prompt-tokens", "32", "--repeats", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["num_texts"], out["num_tokens"]) == (16, 32)
    assert len(out["embeddings_per_s"]["runs"]) == 2 and min(out["embeddings_per_s"]["runs"]) > 0
    assert main(["bench", "--embed", "--model", str(folder), "--prompt-tokens", "32", "--repeats", "1"]) == 0
    assert "embeddings/s, 16 texts of 32 tokens" in capsys.readouterr().out


def test_chat_with_docs_answers_and_names_its_sources(tiny_checkpoints, tmp_path):
    from qwenkit.chat_cli import run_chat

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "serving.md").write_text("# Serving\nqwenkit serve listens on port 8000 by default.\n")
    (docs / "cooking.txt").write_text("Boil the pasta for nine minutes in salted water.\n")
    args = _parser().parse_args(["chat", "--model", str(tiny_checkpoints("qwen3")), "--docs", str(docs),
                                 "--db", str(tmp_path / "chat.sqlite3"), "--max-tokens", "4", "--no-think"])
    out = io.StringIO()
    assert run_chat(args, stdin=io.StringIO("Which port does qwenkit serve listen on?\n"), out=out) == 0
    text = out.getvalue()
    assert "indexed 2 chunks of 2 files" in text
    sources = [line for line in text.splitlines() if line.startswith("sources: ")]
    assert len(sources) == 1 and sources[0].split(": ")[1].split(", ")[0] == "serving.md", text


def test_chat_docs_must_be_a_folder_of_documents(tiny_checkpoints, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder, fragment in [(tmp_path / "nowhere", "no such folder"), (tmp_path / "empty", "no text, Markdown")]:
        argv = ["chat", "--model", str(tiny_checkpoints("qwen3")), "--docs", str(folder), "--db", str(tmp_path / "c")]
        assert main(argv) == 1
        assert fragment in capsys.readouterr().err
