"""The web chat page (`GET /`), end to end in headless Chromium, and its conversation API.

One real server (uvicorn on 127.0.0.1, a tiny random Qwen3, an API key, the MCP echo
server's tools) for the module; `scripted` writes the model's words and `slowed` makes
it slow enough to watch the thinking fold and to stop it. The browser is Debian's
`chromium` driven by Playwright (no downloaded browser); without either the browser
tests skip and the HTTP tests still run.

QWENKIT_SCREENSHOTS=docs/img writes the page's screenshots there (docs/img/web-*.png).
"""

import contextlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest
from tiny import scripted

from qwenkit.server import ServerConfig, create_app

CHROMIUM = os.environ.get("QWENKIT_CHROMIUM", "/usr/bin/chromium")
KEY = "sk-web-test"
MODEL = "tiny-qwen3"
MCP_SERVER = str(Path(__file__).with_name("mcp_echo_server.py"))
AUTH = {"Authorization": f"Bearer {KEY}"}
TOOL_CALL = '<think>I should add them.</think>\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


@pytest.fixture(scope="module")
def chat_db(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("web") / "conversations.sqlite3"


@pytest.fixture(scope="module")
def server_config(chat_db):
    mcp = chat_db.parent / "mcp.json"
    mcp.write_text(json.dumps({"mcpServers": {"echo": {"command": sys.executable, "args": [MCP_SERVER]}}}))
    return ServerConfig(served_model_names=[MODEL], api_key=KEY, chat_db=str(chat_db), mcp_config=str(mcp))


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=30) as client:
        yield client


@contextlib.contextmanager
def slowed(allm, seconds: float):
    """Each engine step takes `seconds` longer: a stream slow enough to watch and stop."""
    runner = allm.llm.engine.runner
    original = runner.run

    def run(batch):
        time.sleep(seconds)
        return original(batch)

    runner.run = run
    try:
        yield
    finally:
        runner.run = original


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def engine_is_idle(allm, timeout: float = 10.0) -> bool:
    blocks = allm.llm.engine.block_manager
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not allm.llm.engine.has_unfinished_requests() and blocks.num_free_blocks == blocks.num_blocks:
            return True
        time.sleep(0.05)
    return False


# -- HTTP: the page, the key, the conversation API -------------------------------------


def test_page_and_its_files_are_open_the_api_needs_the_key(server):
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    # Everything the page loads is served here (no CDN): every src/href is a local path.
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page.text)
    for path in ("app.js", "api.js", "markdown.js", "style.css", "vendor/marked.esm.js", "vendor/purify.es.js",
                 "vendor/highlight.min.js"):
        r = httpx.get(f"{server}/web/static/{path}")
        assert r.status_code == 200, path
        assert r.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript", "text/css")
    assert httpx.get(f"{server}/web/static/nope.js").status_code == 404
    assert httpx.get(f"{server}/web/api/conversations").status_code == 401
    assert httpx.get(f"{server}/web/api/tools").status_code == 401
    assert httpx.get(f"{server}/v1/models").status_code == 401


def test_no_web_serves_no_page(allm):
    from starlette.testclient import TestClient

    client = TestClient(create_app(allm, ServerConfig(web=False)), base_url="http://127.0.0.1")
    assert client.get("/").status_code == 404
    assert client.get("/web/static/app.js").status_code == 404
    assert client.get("/web/api/conversations").status_code == 404
    assert client.get("/health").status_code == 200


def test_conversation_api(api):
    created = api.post("/web/api/conversations", json={})
    assert created.status_code == 201
    conversation = created.json()
    cid = conversation["id"]
    assert conversation["title"] is None
    turn = [{"role": "user", "content": "What is 2 + 3?\nThanks"},
            {"role": "assistant", "content": "5", "reasoning_content": "easy",
             "meta": {"usage": {"prompt_tokens": 9, "completion_tokens": 3}}}]
    appended = api.post(f"/web/api/conversations/{cid}/messages", json={"messages": turn})
    assert appended.status_code == 200 and appended.json()["title"] == "What is 2 + 3? Thanks"
    got = api.get(f"/web/api/conversations/{cid}").json()
    assert got["messages"] == turn
    assert api.patch(f"/web/api/conversations/{cid}", json={"title": "  Sums  "}).json()["title"] == "Sums"
    assert cid in [c["id"] for c in api.get("/web/api/conversations").json()["data"]]
    assert api.delete(f"/web/api/conversations/{cid}").json()["deleted"] is True
    assert api.get(f"/web/api/conversations/{cid}").status_code == 404


@pytest.mark.parametrize("method, path, body, status, words", [
    ("post", "/web/api/conversations/{cid}/messages", {"messages": [{"role": "robot", "content": "x"}]}, 400,
     "role"),
    ("post", "/web/api/conversations/{cid}/messages", {"messages": []}, 400, "messages"),
    ("post", "/web/api/conversations/{cid}/messages", {"messages": [{"role": "user", "content": 1}]}, 400,
     "content"),
    ("post", "/web/api/conversations/{cid}/messages", {"messages": [{"role": "user", "extra": 1}]}, 400, "extra"),
    ("post", "/web/api/conversations/{cid}/messages", "not json", 400, "JSON"),
    ("post", "/web/api/conversations/{cid}/messages", '{"messages": [{"role": "user", "content": "\\ud800"}]}',
     400, "Unicode"),
    ("patch", "/web/api/conversations/{cid}", '{"title": "a\\ud800"}', 400, "Unicode"),
    ("post", "/web/api/conversations/conv_missing/messages", {"messages": [{"role": "user", "content": "x"}]},
     404, "conv_missing"),
    ("patch", "/web/api/conversations/{cid}", {"title": "   "}, 400, "blank"),
    ("patch", "/web/api/conversations/{cid}", {"title": "x" * 201}, 400, "200"),
    ("patch", "/web/api/conversations/{cid}", {}, 400, "title"),
    ("patch", "/web/api/conversations/conv_missing", {"title": "x"}, 404, "conv_missing"),
    ("delete", "/web/api/conversations/conv_missing", None, 404, "conv_missing"),
    ("get", "/web/api/conversations/conv_missing", None, 404, "conv_missing"),
    ("post", "/web/api/conversations", {"title": 5}, 400, "title"),
    ("post", "/web/api/conversations/{cid}/messages",
     {"messages": [{"role": "assistant", "content": "x", "meta": {"tokens_per_s": "fast"}}]}, 400,
     "messages.0.meta.tokens_per_s"),
    ("post", "/web/api/conversations/{cid}/messages",
     {"messages": [{"role": "assistant", "content": "x", "meta": {"usage": {"prompt_tokens": "9"}}}]}, 400,
     "messages.0.meta.usage.prompt_tokens"),
    ("post", "/web/api/tools/nope", {"arguments": "{}"}, 404, "nope"),
    ("post", "/web/api/tools/add", {"arguments": 3}, 400, "arguments"),
])
def test_conversation_api_refuses_bad_input(api, method, path, body, status, words):
    cid = api.post("/web/api/conversations", json={}).json()["id"]
    kwargs = {"content": body} if isinstance(body, str) else {} if body is None else {"json": body}
    if isinstance(body, str):
        kwargs["headers"] = {"content-type": "application/json"}
    r = api.request(method.upper(), path.format(cid=cid), **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_tools_api(api):
    listed = api.get("/web/api/tools").json()
    assert listed["error"] is None
    assert {t["function"]["name"] for t in listed["data"]} == {"add", "echo", "fail"}
    assert api.post("/web/api/tools/add", json={"arguments": '{"a": 2, "b": 3}'}).json()["content"] == "5"
    assert api.post("/web/api/tools/fail", json={"arguments": {}}).json()["content"].startswith("Error")


def test_the_page_ships_in_the_package():
    """pyproject's package data holds every static file: `pip install` is all the page needs."""
    import tomllib

    package = Path(__file__).parent.parent / "qwenkit"
    pyproject = tomllib.loads((package.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["qwenkit"]
    shipped = {path for pattern in patterns for path in package.glob(pattern)}
    static = [p for p in (package / "server" / "web" / "static").rglob("*") if p.is_file()]
    assert static and [p for p in static if p not in shipped] == []


def test_mcp_config_errors(allm, tmp_path):
    from starlette.testclient import TestClient

    from qwenkit.errors import QwenkitError

    with pytest.raises(QwenkitError, match="missing.json"):
        create_app(allm, ServerConfig(mcp_config=str(tmp_path / "missing.json")))
    # A server that cannot start leaves the page without tools (and says why); the chat goes on.
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"gone": {"command": str(tmp_path / "no-such-program")}}}))
    client = TestClient(create_app(allm, ServerConfig(mcp_config=str(config), chat_db=str(tmp_path / "c.db"))),
                        base_url="http://127.0.0.1")
    tools = client.get("/web/api/tools").json()
    assert tools["data"] == [] and "gone" in tools["error"]
    assert client.post("/web/api/tools/add", json={"arguments": {}}).status_code == 404


# -- the page in Chromium ----------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the web tests need Playwright (pip install "
                                   "playwright); no browser download: they drive Debian's chromium")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"the web tests need Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def open_page(browser, url, *, key=KEY, width=1100, height=760):
    context = browser.new_context(viewport={"width": width, "height": height}, color_scheme="light")
    if key:
        context.add_init_script(f"localStorage.setItem('qwenkit.apiKey', {json.dumps(key)})")
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    page.goto(f"{url}/")
    if key:
        page.wait_for_selector("body[data-ready]")
    return page


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server)
    yield page
    assert page.errors == []
    page.context.close()


def send(page, text):
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_label("Message", exact=True).press("Enter")


def wait_answered(page, count=1):
    page.locator("article.assistant[aria-busy=false]").nth(count - 1).wait_for()


def test_streamed_answer_with_thinking_that_folds(page, allm):
    thinking = "Let me think about this greeting carefully."
    with slowed(allm, 0.02), scripted(allm, f"<think>{thinking}</think>Hello **there**, friend."):
        send(page, "Say hello")
        block = page.locator("article.assistant details.thinking")
        block.and_(page.locator("[open]")).wait_for()  # shown live, open, while it thinks
        assert "Thinking" in block.locator("summary").inner_text()
        page.locator("article.assistant details.thinking:not([open])").wait_for()  # folds when the answer starts
        wait_answered(page)
    answer = page.locator("article.assistant").last
    assert answer.locator(".content").inner_text() == "Hello there, friend."
    assert answer.locator(".content strong").inner_text() == "there"
    summary = block.locator("summary").inner_text()
    assert re.search(r"Thought \d+ tokens · \d+\.\d s", summary), summary
    assert block.locator(".thinking-text").text_content().strip() == thinking.strip()
    usage = answer.locator(".usage").inner_text()
    assert re.search(r"prompt \d+ · reasoning \d+ · answer \d+ tokens · [\d.]+ tokens/s", usage), usage
    block.locator("summary").click()  # the user can open it again
    assert block.get_attribute("open") is not None


def test_budget_slider_and_think_switch_change_the_request(page, allm):
    slider = page.get_by_label("Thinking budget")
    slider.focus()
    for _ in range(3):
        slider.press("ArrowRight")
    assert page.locator("#budget-value").inner_text() == "1k"
    with scripted(allm, "<think>short</think>ok", "fine"):
        with page.expect_request("**/v1/chat/completions") as request:
            send(page, "first")
        body = request.value.post_data_json
        assert body["thinking_budget"] == 1024 and body["enable_thinking"] is True
        assert (body["temperature"], body["top_p"], body["top_k"]) == (0.6, 0.95, 20)
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["messages"] == [{"role": "user", "content": "first"}]
        wait_answered(page)

        page.get_by_role("switch", name="Think").uncheck()
        assert slider.is_disabled()
        with page.expect_request("**/v1/chat/completions") as request:
            send(page, "second")
        body = request.value.post_data_json
        assert body["enable_thinking"] is False and "thinking_budget" not in body
        assert (body["temperature"], body["top_p"], body["top_k"]) == (0.7, 0.8, 20)
        # The history goes back without the past thinking.
        assert body["messages"][:2] == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"}]
        wait_answered(page, 2)


def test_settings_panel(page):
    page.get_by_role("button", name="Settings").click()
    dialog = page.get_by_role("dialog", name="Settings")
    assert dialog.is_visible()
    temperature = dialog.get_by_label("Temperature")
    assert temperature.input_value() == "0.6" and dialog.get_by_label("Top-p").input_value() == "0.95"
    temperature.fill("0.3")
    temperature.press("Tab")
    dialog.get_by_label("Max tokens").fill("64")
    dialog.get_by_label("Max tokens").press("Tab")
    page.keyboard.press("Escape")
    assert not dialog.is_visible()
    with page.expect_request("**/v1/chat/completions") as request:
        send(page, "hi")
    body = request.value.post_data_json
    assert body["temperature"] == 0.3 and body["max_tokens"] == 64
    wait_answered(page)
    page.get_by_role("button", name="Settings").click()
    dialog.get_by_role("button", name="Use the recommended values").click()
    assert temperature.input_value() == "0.6"


def test_a_refused_request_is_shown_and_not_saved(page):
    page.get_by_role("button", name="Settings").click()
    page.get_by_label("Top-k").fill("-5")
    page.get_by_label("Top-k").press("Tab")
    page.keyboard.press("Escape")
    send(page, "This will fail")
    alert = page.locator(".msg.error")
    alert.wait_for()
    assert "top_k" in alert.inner_text()
    assert page.locator("article.assistant").count() == 0
    assert page.get_by_label("Message", exact=True).input_value() == "This will fail"  # to retry
    assert page.get_by_role("button", name="Send").is_visible()


def test_stop_aborts_and_the_server_frees_the_request(page, allm, api):
    with slowed(allm, 0.05), scripted(allm, "<think>ok</think>" + "word " * 400):
        send(page, "Talk for a long time")
        answer = page.locator("article.assistant").last
        answer.locator(".content p").wait_for()
        stop = page.get_by_role("button", name="Stop")
        assert stop.evaluate("button => button === document.activeElement")  # focused: Enter or Space stops
        page.keyboard.press("Enter")
        wait_answered(page)
        assert engine_is_idle(allm), "the aborted request still holds the engine"
    assert "stopped" in answer.locator(".usage").inner_text()
    assert page.get_by_role("button", name="Send").is_visible() and not stop.is_visible()
    assert page.get_by_label("Message", exact=True).evaluate("box => box === document.activeElement")
    metrics = api.get("/metrics").text
    assert re.search(r"^qwenkit_requests_running 0\.0$", metrics, re.M)
    # The partial turn is kept, marked stopped.
    cid = page.evaluate("location.hash.slice(1)")
    page.locator("#conversations .current").wait_for()
    saved = api.get(f"/web/api/conversations/{cid}").json()["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant"] and saved[1]["meta"]["stopped"] is True


def test_conversations_persist_across_reload_rename_and_delete(page, allm):
    from playwright.sync_api import expect  # retries until the page catches up

    with scripted(allm, "<think>hm</think>I will remember."):
        send(page, "Remember the number 42")
        wait_answered(page)
    cid = page.evaluate("location.hash.slice(1)")
    item = page.locator(f'#conversations li[data-id="{cid}"]')
    item.wait_for()
    expect(item.locator("a")).to_have_text("Remember the number 42")  # titled once the turn is saved

    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert page.locator("article.user").inner_text() == "Remember the number 42"
    assert page.locator("article.assistant .content").inner_text() == "I will remember."
    assert page.locator("article.assistant details.thinking:not([open])").count() == 1
    assert item.locator("a").get_attribute("aria-current") == "page"

    page.get_by_role("button", name="New chat", exact=True).click()
    assert page.locator("article.msg").count() == 0
    item.locator("a").click()  # back to it through the sidebar
    page.locator("article.user").wait_for()

    item.get_by_role("button", name=re.compile("^Rename")).click()
    title = item.get_by_label("New title")
    title.fill("The answer")
    title.press("Enter")
    page.locator(f'#conversations li[data-id="{cid}"] a', has_text="The answer").wait_for()
    expect(page.locator("#chat-title")).to_have_text("The answer")

    page.once("dialog", lambda d: d.accept())
    item.get_by_role("button", name=re.compile("^Delete")).click()
    item.wait_for(state="detached")
    expect(page.locator("#chat-title")).to_have_text("New chat")
    assert page.locator("article.msg").count() == 0


def test_a_conversation_with_a_malformed_stored_meta_still_opens(browser, server, api, chat_db):
    """The server checks an answer's meta on write; one stored before that (or by another
    program) must not make its conversation impossible to open."""
    from qwenkit.server.web.conversations import ConversationStore

    cid = api.post("/web/api/conversations", json={"title": "Old file"}).json()["id"]
    bad_meta = {"tokens_per_s": "fast", "thinking_s": "long", "usage": {"prompt_tokens": "9", "completion_tokens": {}},
                "error": 5, "elapsed_s": [1]}
    store = ConversationStore(chat_db)
    store.append(cid, [{"role": "user", "content": "Hello there"},
                       {"role": "assistant", "content": "General Kenobi.", "reasoning_content": "hm", "meta": bad_meta}])
    store.close()
    page = open_page(browser, server)
    page.goto(f"{server}/#{cid}")
    page.reload()  # opened at start, from the address
    page.wait_for_selector("body[data-ready]")
    page.locator("article.assistant .content", has_text="General Kenobi.").wait_for()
    assert page.locator("article.user").inner_text() == "Hello there"
    assert page.locator("[role=alert]").count() == 0
    assert page.errors == []
    page.context.close()


def test_model_output_is_never_html(page, allm):
    evil = ('<script>window.pwned = 1</script>\n\n<img src=x onerror="window.pwned = 2">'
            " and [a link](javascript:window.pwned=3)")
    with scripted(allm, evil):
        page.get_by_role("switch", name="Think").uncheck()
        send(page, "Be evil")
        wait_answered(page)
    content = page.locator("article.assistant .content")
    assert "<script>window.pwned = 1</script>" in content.inner_text()
    assert '<img src=x onerror="window.pwned = 2">' in content.inner_text()
    assert content.locator("script, img").count() == 0
    assert content.locator("a[href^=javascript]").count() == 0
    content.locator("a", has_text="a link").click()
    assert page.evaluate("window.pwned") is None


def test_tool_calls_and_results_shown_inline(page, allm):
    with scripted(allm, TOOL_CALL, "<think>It is 5.</think>The sum is 5."):
        with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")
                                 and '"role":"tool"' in (r.post_data or "")) as second:
            send(page, "What is 2 + 3? Use the tool.")
        body = second.value.post_data_json
        wait_answered(page, 2)
    assert {t["function"]["name"] for t in body["tools"]} == {"add", "echo", "fail"}
    assert body["messages"][-1] == {"role": "tool", "tool_call_id": body["messages"][-2]["tool_calls"][0]["id"],
                                    "name": "add", "content": "5"}
    tool = page.locator("details.tool")
    assert tool.locator(".tool-name").inner_text() == "add"
    assert json.loads(tool.locator(".tool-args").inner_text()) == {"a": 2, "b": 3}
    assert tool.locator(".tool-result").inner_text() == "5"
    assert page.locator("article.assistant .content").last.inner_text() == "The sum is 5."
    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert page.locator("details.tool .tool-result").inner_text() == "5"


def test_api_key_is_asked_for_and_remembered_only_when_asked(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server, key=None)
    dialog = page.get_by_role("dialog", name="API key")
    dialog.wait_for()
    dialog.get_by_label("Key").fill("wrong")
    dialog.get_by_role("button", name="Use this key").click()
    expect(page.locator("#key-reason")).to_contain_text("refused")
    dialog.get_by_label("Key").fill(KEY)
    dialog.get_by_label(re.compile("Remember it")).check()
    dialog.get_by_role("button", name="Use this key").click()
    page.wait_for_selector("body[data-ready]")
    assert page.evaluate("localStorage.getItem('qwenkit.apiKey')") == KEY
    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert not dialog.is_visible()
    page.get_by_role("button", name="Settings").click()
    page.get_by_role("button", name="Forget the saved key").click()
    assert page.evaluate("localStorage.getItem('qwenkit.apiKey')") is None
    assert page.errors == []
    page.context.close()


def test_narrow_screen(browser, server):
    page = open_page(browser, server, width=390, height=780)
    sidebar = page.locator("#sidebar")
    assert not sidebar.is_visible() or sidebar.bounding_box()["x"] < -100
    menu = page.get_by_role("button", name="Show conversations")
    menu.click()
    wait_until(lambda: page.locator("#sidebar").bounding_box()["x"] >= 0)
    assert menu.get_attribute("aria-expanded") == "true"
    page.keyboard.press("Escape")
    assert menu.get_attribute("aria-expanded") == "false"
    box = page.get_by_label("Message", exact=True).bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    page.context.close()


@pytest.mark.skipif(not os.environ.get("QWENKIT_SCREENSHOTS"), reason="set QWENKIT_SCREENSHOTS=docs/img to take them")
def test_screenshots(browser, server, allm):
    """The docs' screenshots (docs/img/web-*.png), light, each under 200 KB: run alone
    (`-k screenshots`) for a sidebar without the other tests' conversations."""
    out = Path(os.environ["QWENKIT_SCREENSHOTS"])
    out.mkdir(parents=True, exist_ok=True)
    page = open_page(browser, server, width=1100, height=720)
    answer = ("Here is a function that adds two numbers:\n\n```python\ndef add(a: int, b: int) -> int:\n"
              '    """Add two integers."""\n    return a + b\n```\n\nCall it as `add(2, 3)`, which gives **5**.')
    with scripted(allm, f"<think>The user wants a small Python function. A typed one-liner is enough.</think>{answer}"):
        send(page, "Write a Python function that adds two numbers")
        wait_answered(page)
    page.get_by_label("Thinking budget").fill("4")
    page.get_by_label("Message", exact=True).focus()
    page.screenshot(path=out / "web-chat.png")
    page.get_by_role("button", name="Settings").click()
    page.screenshot(path=out / "web-settings.png")
    narrow = open_page(browser, server, width=390, height=720)
    narrow.goto(page.url)
    narrow.wait_for_selector("body[data-ready]")
    narrow.locator("article.assistant").wait_for()
    narrow.screenshot(path=out / "web-narrow.png")
    narrow.get_by_role("button", name="Show conversations").click()
    wait_until(lambda: narrow.locator("#sidebar").bounding_box()["x"] >= 0)  # slid in
    narrow.screenshot(path=out / "web-narrow-sidebar.png")
    for name in ("web-chat.png", "web-settings.png", "web-narrow.png", "web-narrow-sidebar.png"):
        assert 5_000 < (out / name).stat().st_size < 200_000, name
    for p in (page, narrow):
        assert p.errors == []
        p.context.close()
