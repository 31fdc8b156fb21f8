"""What hostile or broken requests get from `qwenkit serve`: never a 500, always the route's
error shape, bounded metrics, and the Host / Origin checks that keep other web pages out.

A real uvicorn server on 127.0.0.1 over a tiny random Qwen3, without an API key (the
default, where the browser checks matter most), and one with a key.
"""

import os
import random
import string
import subprocess
import sys

import httpx
import pytest
from serving import running_server

from qwenkit.server import ServerConfig, create_app
from qwenkit.server.limits import json_too_deep

KEY = "sk-hardening"
MODEL = "tiny-qwen3"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
DASHSCOPE = "/api/v1/services/aigc/text-generation/generation"
USER = [{"role": "user", "content": "hi"}]
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def open_server(allm, tmp_path_factory):
    config = ServerConfig(served_model_names=[MODEL], chat_db=str(tmp_path_factory.mktemp("db") / "c.sqlite3"))
    with running_server(allm, config) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(allm, tmp_path_factory):
    config = ServerConfig(served_model_names=[MODEL], api_key=KEY,
                          chat_db=str(tmp_path_factory.mktemp("db") / "c.sqlite3"))
    with running_server(allm, config) as url:
        yield url


def openai_error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def dashscope_error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"code", "message", "request_id"} and body["request_id"], body
    return body


# -- 1. a model name that cannot be encoded --------------------------------------------


@pytest.mark.parametrize("route, body", [
    (CHAT, '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}'),
    (COMPLETIONS, '{"model": "\\ud800", "prompt": "hi"}'),
    (DASHSCOPE, '{"model": "\\ud800", "input": {"prompt": "hi"}}'),
    ("/compatible-mode/v1/chat/completions", '{"model": "x\\udfff", "messages": [{"role": "user", "content": "hi"}]}'),
])
def test_a_lone_surrogate_in_model_is_404_not_500(open_server, route, body):
    r = httpx.post(open_server + route, content=body.encode(), headers=JSON)
    assert r.status_code == 404, r.text
    error = dashscope_error(r) if route == DASHSCOPE else openai_error(r)
    assert "\\ud" in error["message"]  # the name, escaped: the body is valid UTF-8 JSON


# -- 2. /metrics stays small whatever paths are asked for ------------------------------


@pytest.mark.slow  # over 10 s (a whole engine in subprocesses, or many of them)
def test_random_paths_leave_metrics_small(open_server, keyed_server):
    rng = random.Random(0)
    before = len(httpx.get(f"{keyed_server}/metrics").content)
    prefixes = ("/v1/", "/api/", "/compatible-mode/", "/web/api/conversations/", "/web/static/", "/", "/health/")
    for base in (open_server, keyed_server):
        with httpx.Client(base_url=base) as http:
            for i in range(2500):
                path = rng.choice(prefixes) + "".join(rng.choices(string.ascii_letters + string.digits, k=12))
                r = http.request("POST" if i % 3 == 0 else "GET", path)
                assert r.status_code < 500
    text = httpx.get(f"{keyed_server}/metrics").text
    assert len(text.encode()) < before + 4096, len(text)
    routes = {line.split('route="')[1].split('"')[0] for line in text.splitlines() if 'route="' in line}
    assert "unmatched" in routes and "/web/api/conversations/{conversation_id}" in routes
    assert len(routes) < 12, routes


# -- 7. bodies that cannot be parsed get the route's error shape -----------------------


@pytest.mark.parametrize("body, words", [
    (b'{"model": "\xff\xfe", "messages": []}', "not UTF-8"),
    (b"[" * 1000 + b"]" * 1000, "too deeply"),
    (b'{"a":' * 1000 + b"1" + b"}" * 1000, "too deeply"),
    (b'{"messages": [', "not valid JSON"),
])
@pytest.mark.parametrize("route", [CHAT, COMPLETIONS, DASHSCOPE])
def test_an_unparsable_body_gets_the_protocol_error_shape(open_server, route, body, words):
    r = httpx.post(open_server + route, content=body, headers=JSON)
    assert r.status_code == 400, r.text
    error = dashscope_error(r) if route == DASHSCOPE else openai_error(r)
    assert words in error["message"]


def test_deep_json_is_refused_whatever_the_recursion_limit(open_server):
    """torch.compile raises the process's recursion limit, under which Python's parser takes
    1,000 levels; the server's own limit must not move with it."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)
    try:
        r = httpx.post(open_server + CHAT, content=b"[" * 1000 + b"]" * 1000, headers=JSON)
    finally:
        sys.setrecursionlimit(limit)
    assert r.status_code == 400 and "too deeply" in openai_error(r)["message"]
    ok = {"messages": [{"role": "user", "content": "[" * 300 + "{" * 300}], "max_tokens": 1}  # brackets in a string
    r = httpx.post(open_server + CHAT, json=ok)
    assert r.status_code == 200, r.text
    assert json_too_deep(b"[" * 257 + b"]" * 257) and not json_too_deep(b"[" * 256 + b"]" * 256)
    assert not json_too_deep(b"[]" * 1000)


def test_an_oversized_prompt_is_refused_before_tokenizing_on_every_route(open_server):
    """Refused by the byte bound (its message), not after the whole text was tokenized."""
    text = "word " * 100_000
    for route, body in [(CHAT, {"messages": [{"role": "user", "content": text}]}),
                        ("/v1/responses", {"input": text}),
                        ("/v1/responses", {"input": [{"role": "user", "content": text}]})]:
        r = httpx.post(open_server + route, json=body)
        assert r.status_code == 400, (route, r.text)
        error = openai_error(r)
        assert error["code"] == "context_length_exceeded" and "bytes, more than" in error["message"], (route, error)


def test_405_says_which_methods_are_allowed(open_server):
    r = httpx.get(open_server + CHAT)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert openai_error(r)["message"].startswith("GET is not allowed")
    r = httpx.put(f"{open_server}/web/api/conversations/conv_x", json={})
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, PATCH"
    r = httpx.put(open_server + DASHSCOPE, json={})
    assert r.status_code == 405 and r.headers["allow"] == "POST" and dashscope_error(r)["code"] == "MethodNotAllowed"


# -- 11. what must be refused --------------------------------------------------------------


@pytest.mark.parametrize("route, body, param", [
    (CHAT, {"messages": USER, "max_tokens": 10**30}, "max_tokens"),
    (CHAT, {"messages": USER, "max_completion_tokens": 10**30}, "max_completion_tokens"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 10**30}, "max_tokens"),
    (COMPLETIONS, {"prompt": [True, False], "max_tokens": 2}, "prompt.0"),
    (COMPLETIONS, {"prompt": [[True]], "max_tokens": 2}, "prompt.0.0"),
    (CHAT, {"messages": USER, "n": True}, "n"),
    (CHAT, {"messages": USER, "top_k": 10**30}, "top_k"),
    (DASHSCOPE, {"input": {"prompt": "hi"}, "parameters": {"max_tokens": 10**30}}, "parameters.max_tokens"),
])
def test_out_of_range_and_mistyped_values_are_400_naming_the_field(open_server, route, body, param):
    r = httpx.post(open_server + route, json=body)
    assert r.status_code == 400, r.text
    if route == DASHSCOPE:
        assert dashscope_error(r)["message"].startswith(param)
    else:
        error = openai_error(r)
        assert error["param"] == param and error["message"].startswith(param)


def test_dashscope_401_has_a_request_id(keyed_server):
    r = httpx.post(keyed_server + DASHSCOPE, json={"input": {"prompt": "hi"}})
    assert r.status_code == 401 and dashscope_error(r)["code"] == "InvalidApiKey"


@pytest.mark.parametrize("host, api_key, warns", [
    ("0.0.0.0", None, True), ("::", None, True), ("192.168.1.5", None, True),
    ("0.0.0.0", "k", False), ("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False),
])
def test_serving_beyond_loopback_without_a_key_warns_at_start(tmp_path, host, api_key, warns):
    # The warning comes before the model loads: a missing model ends the process right after it.
    args = [sys.executable, "-m", "qwenkit", "serve", "--host", host, "--model", str(tmp_path / "none")]
    env = {k: v for k, v in os.environ.items() if k != "QWENKIT_API_KEY"}
    if api_key:
        env["QWENKIT_API_KEY"] = api_key
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1 and "error:" in out.stderr
    assert ("without an API key" in out.stderr) is warns, out.stderr


# -- 4. DNS rebinding: the Host header ------------------------------------------------------


@pytest.mark.parametrize("host, status", [
    ("attacker.example", 421), ("attacker.example:{port}", 421), ("127.0.0.1.nip.io:{port}", 421),
    ("localhost:{port}", 200), ("LOCALHOST", 200), ("127.0.0.1:{port}", 200), ("[::1]:{port}", 200),
])
def test_host_header_allow_list(open_server, host, status):
    port = open_server.rsplit(":", 1)[1]
    for path in ("/v1/models", "/web/api/conversations", "/", "/health"):
        r = httpx.get(open_server + path, headers={"Host": host.format(port=port)})
        assert r.status_code == status, (path, r.text)
    if status == 421:
        error = openai_error(r)
        assert error["code"] == "host_not_allowed"
        assert f"--allowed-hosts {host.split(':')[0]}" in error["message"]


def test_allowed_hosts_extend_the_list(allm, tmp_path):
    from starlette.testclient import TestClient

    def status(config, host):
        client = TestClient(create_app(allm, config), base_url=f"http://{host}")
        return client.get("/v1/models").status_code

    base = {"chat_db": str(tmp_path / "c.sqlite3")}
    assert status(ServerConfig(**base), "qwen.lan") == 421
    assert status(ServerConfig(**base, allowed_hosts=["qwen.lan"]), "qwen.lan:8000") == 200
    assert status(ServerConfig(**base, allowed_hosts=["qwen.lan"]), "other.lan") == 421
    assert status(ServerConfig(**base, allowed_hosts=["*"]), "other.lan") == 200
    # Listening on a named address answers to that name; on every interface, to any IP too.
    assert status(ServerConfig(**base, bind_host="box.lan"), "box.lan:8000") == 200
    assert status(ServerConfig(**base, bind_host="0.0.0.0"), "192.168.1.5:8000") == 200
    assert status(ServerConfig(**base, bind_host="0.0.0.0"), "box.lan") == 421
    assert status(ServerConfig(**base, bind_host="127.0.0.1"), "192.168.1.5") == 421


# -- 5. cross-site writes: the Origin header ------------------------------------------------


def test_a_write_from_another_origin_is_refused(open_server):
    own = open_server  # http://127.0.0.1:PORT
    before = len(httpx.get(f"{own}/web/api/conversations").json()["data"])
    for origin in ("http://attacker.example", "null", "http://127.0.0.1:1", "http://localhost:" + own.rsplit(":", 1)[1]):
        # What a no-cors fetch or a form post from another page sends.
        r = httpx.post(f"{own}/web/api/conversations", content=b"{}",
                       headers={"Origin": origin, "Content-Type": "text/plain"})
        assert r.status_code == 403, (origin, r.text)
        assert openai_error(r)["code"] == "cross_origin_request"
        assert httpx.post(own + CHAT, json={"messages": USER, "max_tokens": 1}, headers={"Origin": origin}) \
            .status_code == 403
    assert len(httpx.get(f"{own}/web/api/conversations").json()["data"]) == before
    # The page's own requests, and clients that send no Origin, go through.
    cid = httpx.post(f"{own}/web/api/conversations", json={}, headers={"Origin": own}).json()["id"]
    assert httpx.delete(f"{own}/web/api/conversations/{cid}", headers={"Origin": own}).status_code == 200
    assert httpx.post(own + CHAT, json={"messages": USER, "max_tokens": 1}).status_code == 200
    # Reading is not writing (and a cross-site page cannot read the answer without CORS).
    assert httpx.get(f"{own}/web/api/conversations", headers={"Origin": "http://attacker.example"}).status_code == 200


def test_with_a_key_the_api_takes_any_origin_but_the_web_api_does_not(keyed_server):
    auth = {"Authorization": f"Bearer {KEY}", "Origin": "http://attacker.example"}
    assert httpx.post(keyed_server + CHAT, json={"messages": USER, "max_tokens": 1}, headers=auth).status_code == 200
    assert httpx.post(f"{keyed_server}/web/api/conversations", json={}, headers=auth).status_code == 403

