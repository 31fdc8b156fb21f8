"""What the loaded model can do, read from its checkpoint: detection on the real templates'
behaviour (Qwen3 hybrid, QwQ always thinking, Qwen2.5 and Qwen3-Instruct-2507 never, the
default model), and how the CLI, the API and the web page report it."""

import json
import shutil
from pathlib import Path

import httpx
import pytest
from hub_cache import INSTRUCT_2507_TEMPLATE, QWEN25_TEMPLATE, QWQ_TEMPLATE, set_chat_template
from serving import running_server
from tiny import make_tokenizer

from qwenkit.capabilities import Capabilities, detect_capabilities
from qwenkit.cli import main
from qwenkit.server import ServerConfig
from qwenkit.tokenizer import Tokenizer

HYBRID = Capabilities(thinking=True, hybrid_thinking=True, tools=True)
NONE = Capabilities(thinking=False, hybrid_thinking=False, tools=True)


def tokenizer_with(tmp_path: Path, template: str | None) -> Tokenizer:
    make_tokenizer(tmp_path)
    if template is not None:
        set_chat_template(tmp_path, template)
    return Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("template, expected", [
    (None, HYBRID),  # the tiny tokenizer's own: the official Qwen3 template
    (QWQ_TEMPLATE, Capabilities(thinking=True, hybrid_thinking=False, tools=False)),
    (INSTRUCT_2507_TEMPLATE, Capabilities(thinking=False, hybrid_thinking=False, tools=False)),
    (QWEN25_TEMPLATE, NONE),
])
def test_detected_from_the_template(tmp_path, template, expected):
    assert detect_capabilities(tokenizer_with(tmp_path, template)) == expected


def test_no_think_tokens_no_thinking(tmp_path):
    """The Qwen3 template asks for thinking, but a vocabulary without <think> cannot write it."""
    tokenizer = tokenizer_with(tmp_path, None)
    real = tokenizer.token_to_id
    tokenizer.token_to_id = lambda t: None if t in ("<think>", "</think>") else real(t)
    assert detect_capabilities(tokenizer) == NONE


def test_default_model(default_gguf):
    """Qwen2.5-Coder-0.5B-Instruct knows tools and cannot think (read from its GGUF, no weights)."""
    from qwenkit.hub import describe
    from qwenkit.model_files import ModelFiles

    info = describe(ModelFiles("gguf", default_gguf, "default"))
    assert info.capabilities == NONE
    assert info.capabilities.names() == ["completion", "tools"]
    assert (info.architecture, info.quantization, info.context_length) == ("qwen2", "Q4_K_M", 32768)


def test_notes():
    assert NONE.thinking_note("m", no_think=True).startswith("m cannot think")
    assert NONE.thinking_note("m", budget=True).startswith("m cannot think")
    assert NONE.thinking_note("m") is None
    always = Capabilities(thinking=True, hybrid_thinking=False, tools=False)
    assert "always thinks" in always.thinking_note("m", no_think=True)
    assert always.thinking_note("m", budget=True) is None
    assert HYBRID.thinking_note("m", no_think=True, budget=True) is None


# -- reported --------------------------------------------------------------------------


def with_template(tiny_checkpoints, tmp_path_factory, name: str, template: str) -> Path:
    """A copy of the tiny Qwen2 checkpoint, with another chat template."""
    folder = tmp_path_factory.mktemp("templated") / name
    shutil.copytree(tiny_checkpoints("qwen2", max_len=1024), folder)
    set_chat_template(folder, template)
    return folder


@pytest.fixture(scope="module")
def plain_model(tiny_checkpoints, tmp_path_factory) -> Path:
    """A tiny checkpoint with Qwen2.5's template: it cannot think."""
    return with_template(tiny_checkpoints, tmp_path_factory, "qwen25", QWEN25_TEMPLATE)


@pytest.fixture(scope="module")
def thinking_model(tiny_checkpoints) -> Path:
    return tiny_checkpoints("qwen3")


def test_run_says_once_when_thinking_flags_do_nothing(plain_model, thinking_model, capsys):
    args = ["run", "--json", "--max-tokens", "2", "--no-think", "--thinking-budget", "8", "hi"]
    assert main([*args[:1], "--model", str(plain_model), *args[1:]]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "cannot think" in line]
    assert notes == [f"qwenkit: {plain_model.name} cannot think: thinking options (--no-think, "
                     "--thinking-budget, /think) have no effect"]
    assert main([*args[:1], "--model", str(thinking_model), *args[1:]]) == 0
    assert "think" not in capsys.readouterr().err
    assert main(["run", "--json", "--max-tokens", "2", "--model", str(plain_model), "hi"]) == 0
    said = capsys.readouterr().err.splitlines()  # no flags, nothing to say but the loading lines (#32.3)
    assert [line.split()[1] for line in said] == ["loading", "loaded"], said


def test_chat_commands_say_what_they_do(plain_model, tmp_path, monkeypatch, capsys):
    import io

    from qwenkit.chat_cli import run_chat
    from qwenkit.cli import _parser

    args = _parser().parse_args(["chat", "--model", str(plain_model), "--db", str(tmp_path / "c.db"),
                                 "--no-think"])
    out = io.StringIO()
    assert run_chat(args, stdin=io.StringIO("/think\n/budget 64\n/no_think\n"), out=out) == 0
    said = out.getvalue()
    assert "thinking on" not in said and "thinking budget 64" not in said
    assert said.count("cannot think") == 3
    assert capsys.readouterr().err.count("cannot think") == 1  # --no-think, at the start


def test_models_endpoint_reports_capabilities(plain_model, thinking_model):
    from qwenkit.async_llm import AsyncLLM

    for folder, expected in ((plain_model, ["completion", "tools"]),
                             (thinking_model, ["completion", "thinking", "hybrid_thinking", "tools"])):
        allm = AsyncLLM(str(folder), progress=False)
        try:
            with running_server(allm, ServerConfig(web=False)) as url:
                models = httpx.get(f"{url}/v1/models").json()["data"]
                assert [m["capabilities"] for m in models] == [expected, expected]  # the model, and `default`
                # The API still takes the thinking fields, whatever the model.
                body = {"model": models[0]["id"], "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 2, "enable_thinking": False, "thinking_budget": 16}
                assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        finally:
            allm.shutdown()


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def always_thinking_model(tiny_checkpoints, tmp_path_factory) -> Path:
    """A tiny checkpoint with a QwQ-style template: it always thinks."""
    return with_template(tiny_checkpoints, tmp_path_factory, "qwq", QWQ_TEMPLATE)


@pytest.mark.parametrize("kind", ["cannot think", "always thinks"])
def test_web_page_disables_the_thinking_controls_that_do_nothing(kind, plain_model, always_thinking_model,
                                                                  tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"needs Chromium at {CHROMIUM}")
    from qwenkit.async_llm import AsyncLLM

    model = plain_model if kind == "cannot think" else always_thinking_model
    allm = AsyncLLM(str(model), progress=False)
    try:
        with running_server(allm, ServerConfig(chat_db=str(tmp_path / "c.db"))) as url, \
                sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
            page = browser.new_page()
            page.goto(f"{url}/")
            page.wait_for_selector("body[data-ready]")
            note, switch, slider = (page.locator("#think-note"), page.get_by_role("switch", name="Think"),
                                    page.get_by_label("Thinking budget"))
            assert note.is_visible() and switch.is_disabled()
            if kind == "cannot think":
                assert note.inner_text() == f"{model.name} cannot think: thinking and its budget are off."
                assert not switch.is_checked() and slider.is_disabled()
            else:
                assert note.inner_text() == f"{model.name} always thinks: the budget caps it."
                assert switch.is_checked() and slider.is_enabled()
            with page.expect_request("**/v1/chat/completions") as request:
                page.get_by_label("Message", exact=True).fill("hi")
                page.get_by_label("Message", exact=True).press("Enter")
            body = request.value.post_data_json
            assert body["enable_thinking"] is (kind == "always thinks") and "thinking_budget" not in body
            # Each mode's recommended sampling: non-thinking 0.7 / 0.8, thinking 0.6 / 0.95.
            assert (body["temperature"], body["top_p"]) == ((0.7, 0.8) if kind == "cannot think" else (0.6, 0.95))
            browser.close()
    finally:
        allm.shutdown()


def test_show_reports_capabilities(thinking_model, capsys):
    assert main(["show", str(thinking_model), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["capabilities"] == ["completion", "thinking", "hybrid_thinking", "tools"]
    assert shown["architecture"] == "qwen3"
    assert main(["show", str(thinking_model)]) == 0
    out = capsys.readouterr().out
    assert "switchable (enable_thinking, /think, /no_think)" in out


# -- rerank: a published reranker, or asked for; never every chat model with "yes" and "no" --


def files_at(path: Path, name: str | None = None):
    from qwenkit.model_files import ModelFiles

    return ModelFiles("gguf" if path.suffix == ".gguf" else "hf", path, name or path.name)


@pytest.mark.parametrize("where, name, reranks", [
    ("Qwen3-8B", None, False),
    ("Qwen3-Reranker-0.6B", None, True),  # a folder, as `qwenkit pull` or a download leaves it
    ("hub/models--Qwen--Qwen3-Reranker-4B/snapshots/0123abc", "Qwen/Qwen3-Reranker-4B", True),
    ("hub/models--Qwen--Qwen3-8B/snapshots/0123abc", "Qwen/Qwen3-8B", False),
    ("qwen3-reranker-0.6b-q8_0.gguf", None, True),
    ("Qwen3-0.6B-Q8_0.gguf", None, False),
])
def test_a_reranker_is_read_from_what_it_is_published_as(tmp_path, where, name, reranks):
    from qwenkit.capabilities import checkpoint_capabilities

    caps = checkpoint_capabilities(HYBRID, files_at(tmp_path / where, name))
    assert caps.rerank is reranks
    assert ("rerank" in caps.names()) is reranks
    assert (caps.thinking, caps.tools) == (True, True)  # the template's findings are kept


def test_a_cross_encoder_config_or_a_task_makes_a_reranker(tmp_path):
    from qwenkit.capabilities import checkpoint_capabilities

    folder = tmp_path / "my-model"
    folder.mkdir()
    assert not checkpoint_capabilities(HYBRID, files_at(folder)).rerank
    assert checkpoint_capabilities(HYBRID, files_at(folder), task="rerank").rerank
    assert checkpoint_capabilities(HYBRID, files_at(folder), task="embed").names() == ["embedding"]
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"model_type": "CrossEncoder"}))
    assert checkpoint_capabilities(HYBRID, files_at(folder)).rerank
    assert not checkpoint_capabilities(HYBRID, files_at(folder), task="generate").rerank
    with pytest.raises(ValueError, match="task must be one of generate, embed, rerank"):
        checkpoint_capabilities(HYBRID, files_at(folder), task="score")


@pytest.fixture(scope="module")
def yes_no_chat_model(tmp_path_factory) -> Path:
    """A chat model whose vocabulary holds "yes" and "no" (as every Qwen's does), not named a reranker."""
    from tiny_retrieval import make_retrieval_checkpoint

    folder = tmp_path_factory.mktemp("chat")
    make_retrieval_checkpoint(folder, "reranker")
    return folder


@pytest.mark.parametrize("task", [None, "rerank"])
def test_the_api_reranks_only_with_a_reranker(yes_no_chat_model, task):
    from qwenkit import LLM, AsyncLLM

    allm = AsyncLLM(str(yes_no_chat_model), dtype="float32", kv_cache_dtype="float32", progress=False, task=task)
    try:
        with running_server(allm, ServerConfig(served_model_names=["tiny"])) as url:
            listed = httpx.get(url + "/v1/models").json()["data"][0]["capabilities"]
            body = {"model": "tiny", "query": "fox", "documents": ["the quick brown fox", "def f(): pass"]}
            r = httpx.post(url + "/v1/rerank", json=body, timeout=60)
    finally:
        allm.shutdown()
    if task is None:
        assert "rerank" not in listed and "completion" in listed
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_reranker", r.text
        assert "not a reranker" in r.json()["error"]["message"]
    else:
        assert "rerank" in listed
        assert r.status_code == 200, r.text
        expected = LLM(str(yes_no_chat_model), dtype="float32", kv_cache_dtype="float32", progress=False).score(
            "fox", body["documents"])
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        assert abs(got[0] - expected[0]) <= 1e-6 and abs(got[1] - expected[1]) <= 1e-6


def test_llm_refuses_an_unknown_task():
    from qwenkit import LLM

    with pytest.raises(ValueError, match="task must be one of"):
        LLM("/nonexistent", task="classify")
