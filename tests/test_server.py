"""The HTTP server, driven over real HTTP by the real `openai` and `dashscope` SDKs.

One uvicorn server on 127.0.0.1 (a free port) serves a tiny random Qwen3 for the whole
module; `scripted` forces the model's words where a test needs thinking or tool calls.
"""

import json
import threading
import time

import httpx
import pytest
from serving import running_server
from tiny import scripted

openai = pytest.importorskip("openai")
dashscope = pytest.importorskip("dashscope")

from qwenkit.server import ServerConfig  # noqa: E402

KEY = "sk-test-key"
MODEL = "tiny-qwen3"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
THINK_THEN_ANSWER = "<think>\nThe user asks about weather.\n</think>\n\nIt is sunny."
TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def server_config():
    return ServerConfig(served_model_names=[MODEL], api_key=KEY, max_body_bytes=64 * 1024,
                        max_running_requests=4, max_waiting_requests=2)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def kv_pool_is_full(allm, timeout=5.0) -> bool:
    blocks = allm.llm.engine.block_manager
    deadline = time.time() + timeout
    while time.time() < deadline:
        if blocks.num_free_blocks == blocks.num_blocks and not allm.llm.engine.has_unfinished_requests():
            return True
        time.sleep(0.05)
    return False


# -- OpenAI --------------------------------------------------------------------------


def test_chat_separates_reasoning_from_content(client, allm):
    with scripted(allm, THINK_THEN_ANSWER):
        out = client.chat.completions.create(model=MODEL, messages=USER, temperature=0)
    choice = out.choices[0]
    assert choice.message.content == "It is sunny."
    assert choice.message.model_extra["reasoning_content"] == "The user asks about weather."
    assert choice.message.model_extra["reasoning"] == "The user asks about weather."
    assert choice.finish_reason == "stop"
    assert out.model == MODEL
    u = out.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 0 < u.completion_tokens_details.reasoning_tokens < u.completion_tokens


def test_chat_stream_with_usage(client, allm):
    with scripted(allm, THINK_THEN_ANSWER):
        stream = client.chat.completions.create(
            model=MODEL, messages=USER, temperature=0, stream=True, stream_options={"include_usage": True},
        )
        chunks = list(stream)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == "The user asks about weather."
    assert content == "It is sunny."
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert kv_pool_is_full(allm)


def test_tool_call_round_trip(client, allm):
    with scripted(allm, TOOL_CALL):
        out = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, temperature=0,
                                             parallel_tool_calls=True, extra_body={"enable_thinking": False})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    # The assistant turn (content null beside tool calls) and the tool result go back in.
    messages = USER + [choice.message.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]
    with scripted(allm, "It is sunny in Paris."):
        answer = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0,
                                                extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert answer.choices[0].message.content == "It is sunny in Paris."


def test_tool_call_stream_deltas(client, allm):
    with scripted(allm, TOOL_CALL):
        chunks = list(client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, temperature=0,
                                                     stream=True, extra_body={"enable_thinking": False}))
    pieces = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].index == 0 and pieces[0].id.startswith("call_") and pieces[0].function.name == "get_weather"
    arguments = "".join(p.function.arguments or "" for p in pieces)
    assert json.loads(arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_thinking_budget_is_honoured(client, allm, ds_base):
    from dashscope import Generation

    thought = " ".join(f"step{i}" for i in range(40))
    with scripted(allm, f"<think>\n{thought}\n</think>\n\nDone."):
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=USER, temperature=0, max_tokens=200, stream=True,
            extra_body={"chat_template_kwargs": {"thinking_budget": 10}},
        ))
        r = Generation.call(model=MODEL, messages=USER, result_format="message", api_key=KEY, thinking_budget=10,
                            max_tokens=200)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    assert reasoning.startswith("step0") and "step9" not in reasoning
    assert reasoning.endswith("based on the thinking directly now.")
    assert r.output.choices[0].message.reasoning_content == reasoning
    assert r.output.choices[0].message.content


def test_dashscope_tool_call(ds_base, allm):
    from dashscope import Generation

    with scripted(allm, TOOL_CALL):
        r = Generation.call(model=MODEL, messages=USER, tools=TOOLS, result_format="message", api_key=KEY,
                            enable_thinking=False)
    assert r.status_code == 200, r.message
    choice = r.output.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_n_choices_and_length(client):
    out = client.chat.completions.create(model=MODEL, messages=USER, n=2, max_completion_tokens=3,
                                         extra_body={"ignore_eos": True, "enable_thinking": False})
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.finish_reason for c in out.choices] == ["length", "length"], out
    assert out.usage.completion_tokens == 6


def test_completions(client, allm):
    out = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=5, temperature=0,
                                    logprobs=2, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == 5 and all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    assert out.usage.completion_tokens == 5
    stream = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=5, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == 5


def _check_chat_logprobs(content, k=2):
    assert content, "no logprobs"
    for entry in content:
        tops = entry.top_logprobs
        assert len(tops) == k
        assert [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        assert entry.bytes == list(entry.token.encode("utf-8"))
        # temperature 0: the chosen token is the likeliest one.
        assert entry.token == tops[0].token and entry.logprob == pytest.approx(tops[0].logprob)


def test_chat_logprobs(client, server):
    kwargs = dict(model=MODEL, messages=USER, temperature=0, max_completion_tokens=6, logprobs=True, top_logprobs=2,
                  extra_body={"ignore_eos": True, "enable_thinking": False})
    out = client.chat.completions.create(**kwargs)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    _check_chat_logprobs(content)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(streamed) == chunks[-1].usage.completion_tokens == 6
    _check_chat_logprobs(streamed)
    assert [e.token for e in streamed] == [e.token for e in content]
    # Not asked: null.
    plain = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=2,
                                           extra_body={"enable_thinking": False})
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"
    # DashScope: parameters.logprobs -> output.choices[i].logprobs, the same shape.
    body = {"model": MODEL, "input": {"messages": USER}, "parameters": {
        "result_format": "message", "logprobs": True, "top_logprobs": 2, "max_tokens": 3, "temperature": 0,
        "enable_thinking": False}}
    r = httpx.post(f"{server}/api/v1/services/aigc/text-generation/generation",
                   headers={"Authorization": f"Bearer {KEY}"}, json=body).json()
    ds_content = r["output"]["choices"][0]["logprobs"]["content"]
    assert len(ds_content) == r["usage"]["output_tokens"] and all(len(e["top_logprobs"]) == 2 for e in ds_content)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == [MODEL, "default"]  # "default": an alias
    assert httpx.get(f"{server}/health").json()["status"] == "ok"  # no key needed


@pytest.mark.parametrize("kwargs, param", [
    ({"top_p": 5}, "top_p"),
    ({"n": 100}, "n"),
    ({"temperature": "hot"}, "temperature"),
    ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
    ({"messages": []}, "messages"),
])
def test_bad_input_is_400_naming_the_field(client, kwargs, param):
    kwargs = {"model": MODEL, "messages": USER, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kwargs)
    assert e.value.status_code == 400
    assert param in e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error"


def test_too_long_prompt_is_400(client):
    long = [{"role": "user", "content": "hello " * 3000}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=long, stream=stream)
        assert e.value.body["code"] == "context_length_exceeded"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=USER)
    assert e.value.body["code"] == "model_not_found"


def test_api_key_required(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and "API key" in e.value.body["message"]
    assert httpx.post(f"{server}/v1/chat/completions", json={}).status_code == 401


def test_body_limit_is_413(server):
    r = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 100_000}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_not_json_is_400(server):
    r = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800"}]}'),
    ("/v1/completions", '{"model": "%s", "prompt": "\\ud800", "max_tokens": 2}'),
])
def test_lone_surrogate_is_400_not_500(server, route, body):
    r = httpx.post(f"{server}{route}", content=(body % MODEL).encode(),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]["message"]


def test_busy_server_is_429_with_retry_after(server, allm):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "messages": USER, "max_tokens": 300, "stream": True, "ignore_eos": True}
    release = threading.Event()

    def hold_a_stream():
        with httpx.Client(timeout=60) as http, http.stream(
            "POST", f"{server}/v1/chat/completions", headers=headers, json=body
        ) as r:
            for _ in r.iter_lines():
                if release.is_set():
                    return

    holders = [threading.Thread(target=hold_a_stream) for _ in range(6)]  # 4 running + 2 waiting
    for t in holders:
        t.start()
    try:
        deadline = time.time() + 20
        while requests_waiting(server) < 2:
            assert time.time() < deadline, "the slots did not fill"
            time.sleep(0.05)
        r = httpx.post(f"{server}/v1/chat/completions", headers=headers, json=body)
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        release.set()
        for t in holders:
            t.join(timeout=60)
    assert kv_pool_is_full(allm, timeout=20)


def requests_waiting(server) -> int:
    text = httpx.get(f"{server}/metrics").text
    line = next(line for line in text.splitlines() if line.startswith("qwenkit_requests_waiting "))
    return int(float(line.split()[1]))


def test_disconnect_frees_the_request(server, allm):
    body = {"model": MODEL, "messages": USER, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                         json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert allm.llm.engine.has_unfinished_requests()
    assert kv_pool_is_full(allm, timeout=10)


def test_disconnect_frees_a_non_streaming_request(server, allm):
    body = {"model": MODEL, "messages": USER, "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json=body,
                   timeout=0.5)
    assert kv_pool_is_full(allm, timeout=10)


def test_request_timeout(allm):
    body = {"messages": USER, "max_tokens": 1500, "ignore_eos": True}
    with running_server(allm, ServerConfig(request_timeout_s=0.3)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30)
        assert r.status_code == 200
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert '"code":"timeout"' in events[-2] and events[-1] == "data: [DONE]"
    assert kv_pool_is_full(allm)


def test_metrics(server, client):
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    text = httpx.get(f"{server}/metrics").text
    assert 'qwenkit_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "qwenkit_kv_blocks_in_use" in text and "qwenkit_time_to_first_token_seconds_bucket" in text


def test_openapi_lists_the_routes(server):
    paths = httpx.get(f"{server}/openapi.json").json()["paths"]
    for route in ("/v1/chat/completions", "/v1/completions", "/v1/models",
                  "/api/v1/services/aigc/text-generation/generation", "/compatible-mode/v1/chat/completions"):
        assert route in paths


# -- DashScope -----------------------------------------------------------------------


@pytest.fixture()
def ds_base(server, monkeypatch):
    monkeypatch.setattr(dashscope, "base_http_api_url", f"{server}/api/v1")
    return server


def test_dashscope_message(ds_base, allm):
    from dashscope import Generation

    with scripted(allm, THINK_THEN_ANSWER):
        r = Generation.call(model=MODEL, messages=USER, result_format="message", api_key=KEY)
    assert r.status_code == 200, r.message
    message = r.output.choices[0].message
    assert message.content == "It is sunny."
    assert message.reasoning_content == "The user asks about weather."
    assert r.output.choices[0].finish_reason == "stop"
    assert r.usage.input_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details["reasoning_tokens"] > 0
    assert r.request_id


def test_dashscope_stream_incremental(ds_base, allm):
    from dashscope import Generation

    with scripted(allm, THINK_THEN_ANSWER):
        responses = list(Generation.call(model=MODEL, messages=USER, result_format="message", stream=True,
                                         incremental_output=True, api_key=KEY))
    assert all(r.status_code == 200 for r in responses)
    content = "".join(r.output.choices[0].message.content for r in responses)
    reasoning = "".join(r.output.choices[0].message.reasoning_content for r in responses)
    assert (reasoning, content) == ("The user asks about weather.", "It is sunny.")
    assert responses[-1].output.choices[0].finish_reason == "stop"
    assert responses[-1].usage.output_tokens > 0


def test_dashscope_text_and_cumulative_stream(ds_base, allm):
    headers = {"Authorization": f"Bearer {KEY}", "X-DashScope-SSE": "enable"}
    body = {"model": MODEL, "input": {"prompt": "Hi"},
            "parameters": {"result_format": "text", "incremental_output": False, "enable_thinking": False}}
    with scripted(allm, "It is sunny."):
        r = httpx.post(f"{ds_base}/api/v1/services/aigc/text-generation/generation", headers=headers, json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("id:") and "\nevent:result\n:HTTP_STATUS/200\ndata:" in e for e in events)
    data = [json.loads(e.split("data:", 1)[1]) for e in events]
    texts = [d["output"]["text"] for d in data]
    assert texts[-1] == "It is sunny." and all(texts[-1].startswith(t) for t in texts)  # cumulative
    assert [d["output"]["finish_reason"] for d in data][-1] == "stop"
    assert all(d["output"]["finish_reason"] == "null" for d in data[:-1])


def test_dashscope_errors(ds_base):
    from dashscope import Generation

    r = Generation.call(model=MODEL, messages=USER, top_p=5.0, api_key=KEY)
    assert r.status_code == 400 and r.code == "InvalidParameter" and "top_p" in r.message
    r = Generation.call(model=MODEL, messages=USER, api_key="wrong")
    assert r.status_code == 401 and r.code == "InvalidApiKey"


def test_compatible_mode_route(server, allm):
    client = openai.OpenAI(base_url=f"{server}/compatible-mode/v1", api_key=KEY, max_retries=0)
    with scripted(allm, "It is sunny."):
        out = client.chat.completions.create(model=MODEL, messages=USER, extra_body={"enable_thinking": False})
    assert out.choices[0].message.content == "It is sunny."
