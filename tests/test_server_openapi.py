"""`/openapi.json` says what the server does: real answers, the errors each route sends,
no 422 (never sent), text/plain /metrics; and real answers validate against it."""

import httpx
import jsonschema
import pytest
from tiny import scripted

from qwenkit.server import ServerConfig

MODEL = "tiny-qwen3"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server_config(tmp_path_factory):
    db = tmp_path_factory.mktemp("db")
    return ServerConfig(served_model_names=[MODEL], chat_db=str(db / "c.sqlite3"), responses_db=str(db / "r.sqlite3"),
                        max_body_bytes=64 * 1024)


@pytest.fixture(scope="module")
def doc(server):
    return httpx.get(f"{server}/openapi.json").json()


def operations(doc):
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            yield path, method, op


def test_no_422_and_the_errors_each_route_sends(doc):
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, method, op in operations(doc):
        assert "422" not in op["responses"], (path, method)
        assert "421" in op["responses"], (path, method)  # the Host check answers every route
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "403", "404", "413", "421", "429"} <= set(chat)
    assert "401" not in chat  # this server has no key
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    assert chat["429"]["headers"]["Retry-After"]["required"] is True
    dashscope = doc["paths"]["/api/v1/services/aigc/text-generation/generation"]["post"]["responses"]
    assert dashscope["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/DashScopeError"}
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "201" in doc["paths"]["/web/api/conversations"]["post"]["responses"]


def test_with_a_key_the_protected_routes_document_401(allm, tmp_path):
    from starlette.testclient import TestClient

    from qwenkit.server import create_app

    app = create_app(allm, ServerConfig(api_key="k", chat_db=str(tmp_path / "c.sqlite3"), request_timeout_s=5))
    doc = TestClient(app, base_url="http://127.0.0.1").get("/openapi.json").json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert {"401", "504"} <= set(chat["responses"]) and chat["security"] == [{"apiKey": []}]
    assert "403" not in chat["responses"]  # with a key, the API takes any Origin
    assert "403" in doc["paths"]["/web/api/conversations"]["post"]["responses"]
    assert "401" not in doc["paths"]["/health"]["get"]["responses"]


def test_request_schemas_are_as_strict_as_the_validation(doc):
    schemas = doc["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}
    assert chat["top_p"]["anyOf"][0] == {"type": "number", "exclusiveMinimum": 0.0, "maximum": 1.0}
    assert chat["tool_choice"]["anyOf"][0] == {"type": "string", "enum": ["none", "auto", "required"]}
    assert schemas["GenerationInput"]["anyOf"] == [{"required": ["messages"]}, {"required": ["prompt"]}]


def check(doc, response: httpx.Response, path: str, method: str = "post") -> None:
    """`response` is one the document lists for the route, and its body fits the schema."""
    documented = doc["paths"][path][method]["responses"]
    assert str(response.status_code) in documented, (path, response.status_code)
    content = documented[str(response.status_code)]["content"]
    media = response.headers["content-type"].split(";")[0]
    assert media in content, (path, media)
    if media == "application/json":
        schema = {**content[media]["schema"], "components": doc["components"]}
        jsonschema.validate(response.json(), schema)


def test_real_answers_fit_the_document(server, doc, allm):
    with scripted(allm, "<think>hm</think>Hello."):
        check(doc, httpx.post(f"{server}/v1/chat/completions", json={"messages": USER, "logprobs": True,
                                                                     "top_logprobs": 2}), "/v1/chat/completions")
    with scripted(allm, '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'):
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        check(doc, httpx.post(f"{server}/v1/chat/completions", json={"messages": USER, "tools": tools}),
              "/v1/chat/completions")
    check(doc, httpx.post(f"{server}/v1/chat/completions", json={"messages": USER, "stream": True, "max_tokens": 2}),
          "/v1/chat/completions")
    check(doc, httpx.post(f"{server}/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "logprobs": 2}),
          "/v1/completions")
    ds = "/api/v1/services/aigc/text-generation/generation"
    for parameters in ({"result_format": "message", "logprobs": True}, {"result_format": "text"}):
        check(doc, httpx.post(server + ds, json={"input": {"prompt": "Hi"}, "parameters": {**parameters,
                                                                                            "max_tokens": 3}}), ds)
    check(doc, httpx.get(f"{server}/v1/models"), "/v1/models", "get")
    check(doc, httpx.get(f"{server}/health"), "/health", "get")
    check(doc, httpx.get(f"{server}/metrics"), "/metrics", "get")
    created = httpx.post(f"{server}/web/api/conversations", json={"title": "T"})
    check(doc, created, "/web/api/conversations")
    cid = created.json()["id"]
    turn = {"messages": [{"role": "user", "content": "x"},
                         {"role": "assistant", "content": "y", "meta": {"tokens_per_s": 3.5, "usage": {
                             "prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}}]}
    item = "/web/api/conversations/{conversation_id}"
    check(doc, httpx.post(f"{server}/web/api/conversations/{cid}/messages", json=turn), item + "/messages")
    check(doc, httpx.get(f"{server}/web/api/conversations/{cid}"), item, "get")
    check(doc, httpx.patch(f"{server}/web/api/conversations/{cid}", json={"title": "U"}), item, "patch")
    check(doc, httpx.get(f"{server}/web/api/conversations"), "/web/api/conversations", "get")
    check(doc, httpx.delete(f"{server}/web/api/conversations/{cid}"), item, "delete")
    check(doc, httpx.get(f"{server}/web/api/tools"), "/web/api/tools", "get")


def test_real_errors_fit_the_document(server, doc):
    chat, ds = "/v1/chat/completions", "/api/v1/services/aigc/text-generation/generation"
    check(doc, httpx.post(server + chat, json={"messages": []}), chat)
    check(doc, httpx.post(server + chat, json={"model": "nope", "messages": USER}), chat)
    check(doc, httpx.post(server + chat, content=b"x" * 70_000), chat)
    check(doc, httpx.post(server + chat, json={"messages": USER}, headers={"Origin": "http://attacker.example"}),
          chat)
    check(doc, httpx.post(server + chat, json={"messages": USER}, headers={"Host": "attacker.example"}), chat)
    check(doc, httpx.post(server + ds, json={"input": {}}), ds)
    check(doc, httpx.post(server + ds, json={"model": "nope", "input": {"prompt": "x"}}), ds)
    check(doc, httpx.get(f"{server}/web/api/conversations/conv_none"), "/web/api/conversations/{conversation_id}",
          "get")


def test_responses_and_conversations_answers_fit_the_document(server, doc, allm):
    with scripted(allm, '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'):
        check(doc, httpx.post(f"{server}/v1/chat/completions", json={
            "messages": USER, "functions": [{"name": "f", "parameters": {"type": "object"}}]}), "/v1/chat/completions")
    created = httpx.post(f"{server}/v1/responses", json={"input": "hi", "max_output_tokens": 2})
    check(doc, created, "/v1/responses")
    rid, one = created.json()["id"], "/v1/responses/{response_id}"
    check(doc, httpx.get(f"{server}/v1/responses/{rid}/input_items"), one + "/input_items", "get")
    check(doc, httpx.get(f"{server}/v1/responses/{rid}/input_items?after=x"), one + "/input_items", "get")
    check(doc, httpx.post(f"{server}/v1/responses/{rid}/cancel"), one + "/cancel")
    check(doc, httpx.post(f"{server}/v1/responses/input_tokens", json={"input": "hi"}), "/v1/responses/input_tokens")
    check(doc, httpx.delete(f"{server}/v1/responses/{rid}"), one, "delete")
    check(doc, httpx.delete(f"{server}/v1/responses/{rid}"), one, "delete")
    conversation = httpx.post(f"{server}/v1/conversations", json={"items": [{"role": "user", "content": "hi"}]})
    check(doc, conversation, "/v1/conversations")
    cid, one = conversation.json()["id"], "/v1/conversations/{conversation_id}"
    check(doc, httpx.get(f"{server}/v1/conversations/{cid}"), one, "get")
    check(doc, httpx.post(f"{server}/v1/conversations/{cid}", json={"metadata": {"a": "b"}}), one)
    added = httpx.post(f"{server}/v1/conversations/{cid}/items", json={"items": [{"type": "reasoning"}]})
    check(doc, added, one + "/items")
    check(doc, httpx.get(f"{server}/v1/conversations/{cid}/items"), one + "/items", "get")
    item_id = added.json()["data"][0]["id"]
    check(doc, httpx.get(f"{server}/v1/conversations/{cid}/items/{item_id}"), one + "/items/{item_id}", "get")
    check(doc, httpx.delete(f"{server}/v1/conversations/{cid}/items/{item_id}"), one + "/items/{item_id}", "delete")
    check(doc, httpx.delete(f"{server}/v1/conversations/{cid}"), one, "delete")
    check(doc, httpx.get(f"{server}/v1/conversations/{cid}"), one, "get")
