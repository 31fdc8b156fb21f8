"""The OpenAI surface 2026 clients use, over real HTTP with the real `openai` SDK: the
Responses API, `GET /v1/models/{id}` and the `default` alias, OpenAI's parameter ranges,
and tool calls (`required` that stops, calls written as JSON text, arguments sent back as
strings) on the OpenAI and DashScope routes.

A tiny random Qwen3 serves the module; `scripted` forces its words where a test needs
thinking or tool calls.
"""

import json

import httpx
import pytest
from tiny import scripted

openai = pytest.importorskip("openai")
dashscope = pytest.importorskip("dashscope")

from openai.types.responses import (  # noqa: E402
    ResponseCompletedEvent,
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseReasoningItem,
    ResponseTextDeltaEvent,
)

from qwenkit.server import ServerConfig  # noqa: E402

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
RESPONSE_TOOLS = [{"type": "function", **TOOLS[0]["function"]}]
THINK_THEN_ANSWER = "<think>\nThe user asks about weather.\n</think>\n\nIt is sunny."
TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
JSON_CALL = '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'


@pytest.fixture(scope="module")
def server_config(tmp_path_factory):
    db = tmp_path_factory.mktemp("responses") / "responses.sqlite3"
    return ServerConfig(served_model_names=[MODEL], web=False, responses_db=str(db))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


# -- models --------------------------------------------------------------------------


def test_models_retrieve_and_the_default_alias(client):
    assert [m.id for m in client.models.list()] == [MODEL, "default"]
    assert client.models.retrieve(MODEL).id == MODEL
    alias = client.models.retrieve("default")
    assert (alias.id, alias.model_extra["root"]) == ("default", MODEL)
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.body["code"] == "model_not_found"
    reply = client.chat.completions.create(model="default", messages=USER, max_tokens=2)
    assert reply.model == MODEL


@pytest.mark.parametrize("field, value", [
    ("temperature", 9), ("temperature", -0.1), ("top_p", 1.5), ("presence_penalty", 2.5),
    ("frequency_penalty", -3), ("n", 0), ("top_logprobs", 21), ("logit_bias", {"11": 101}),
])
def test_openai_ranges_are_400_naming_the_field(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, **{field: value})
    assert e.value.body["param"].startswith(field)
    assert field in e.value.body["message"]
    if field != "top_logprobs":  # a chat-only field
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={field: value})


def test_openai_range_edges_are_accepted(client):
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=2, top_p=1,
                                           presence_penalty=-2, frequency_penalty=2)
    assert reply.choices[0].finish_reason == "length"


# -- tool calls ----------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_call_stops_after_the_call(client, allm, choice, parallel):
    """The model writes one call and "\\n", then ends its turn: the grammar used to force
    another <tool_call> there, so the reply was N calls and finish_reason "length"."""
    with scripted(allm, TOOL_CALL + "\n"):
        reply = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=choice,
                                               parallel_tool_calls=parallel, max_tokens=100)
    choice_ = reply.choices[0]
    assert choice_.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in choice_.message.tool_calls] == [
        ("get_weather", '{"city": "Paris"}')]
    assert choice_.message.content is None


def test_required_tool_call_stops_on_dashscope(server, allm, monkeypatch):
    monkeypatch.setattr(dashscope, "base_http_api_url", f"{server}/api/v1")
    with scripted(allm, TOOL_CALL + "\n"):
        response = dashscope.Generation.call(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                             result_format="message", max_tokens=100, api_key="unused")
    assert response.status_code == 200, response
    choice = response.output.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c["function"]["name"] for c in choice.message.tool_calls] == ["get_weather"]


@pytest.mark.parametrize("stream", [False, True])
def test_call_written_as_json_text_is_a_tool_call(client, allm, stream):
    with scripted(allm, JSON_CALL):
        reply = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, max_tokens=100,
                                               stream=stream, extra_body={"enable_thinking": False})
        if stream:
            chunks = [c for c in reply if c.choices]
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
            finish = chunks[-1].choices[0].finish_reason
        else:
            content = reply.choices[0].message.content or ""
            calls = reply.choices[0].message.tool_calls
            finish = reply.choices[0].finish_reason
    assert content == ""  # nothing of the call streamed as text
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert finish == "tool_calls"


def _round_trip(arguments):
    return [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]


def test_tool_call_arguments_sent_back_as_strings(client, server, allm, monkeypatch):
    with scripted(allm, "It is sunny."):
        reply = client.chat.completions.create(model=MODEL, messages=_round_trip('{"city": "Paris"}'), tools=TOOLS,
                                               max_tokens=20, extra_body={"enable_thinking": False})
    assert reply.choices[0].message.content == "It is sunny."
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=_round_trip("city=Paris"), tools=TOOLS, max_tokens=2)
    assert "messages[1].tool_calls[0].function.arguments" in e.value.body["message"]
    monkeypatch.setattr(dashscope, "base_http_api_url", f"{server}/api/v1")
    response = dashscope.Generation.call(model=MODEL, messages=_round_trip("[1]"), tools=TOOLS,
                                         result_format="message", max_tokens=2, api_key="unused")
    assert response.status_code == 400 and "function.arguments must be a JSON object" in response.message


# -- Responses -----------------------------------------------------------------------


def test_responses_text_with_reasoning(client, allm):
    with scripted(allm, THINK_THEN_ANSWER):
        response = client.responses.create(model=MODEL, input="What is the weather in Paris?",
                                           instructions="Be brief.", max_output_tokens=60)
    assert response.status == "completed" and response.object == "response" and response.model == MODEL
    reasoning, message = response.output
    assert isinstance(reasoning, ResponseReasoningItem) and isinstance(message, ResponseOutputMessage)
    assert reasoning.content[0].text == "The user asks about weather."
    assert response.output_text == "It is sunny."
    assert response.instructions == "Be brief."
    usage = response.usage
    assert usage.input_tokens > 10 and usage.output_tokens > 0 and usage.output_tokens_details.reasoning_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_responses_stream_events(client, allm):
    with scripted(allm, THINK_THEN_ANSWER):
        events = list(client.responses.create(model=MODEL, input=USER, max_output_tokens=60, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds.index("response.reasoning_text.delta") < kinds.index("response.output_text.delta")
    for kind in ("response.output_item.added", "response.content_part.added", "response.output_text.done",
                 "response.content_part.done", "response.output_item.done", "response.reasoning_text.done"):
        assert kind in kinds
    text = "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))
    final = events[-1]
    assert isinstance(final, ResponseCompletedEvent)
    assert text == final.response.output_text == "It is sunny."
    assert final.response.usage.output_tokens > 0


def test_responses_stream_helper_accumulates(client, allm):
    with scripted(allm, "It is sunny."):
        with client.responses.stream(model=MODEL, input="Weather?", max_output_tokens=20,
                                     reasoning={"effort": "none"}) as stream:
            text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
            final = stream.get_final_response()
    assert text == final.output_text == "It is sunny."
    assert [item.type for item in final.output] == ["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_responses_function_call_round_trip(client, allm, stream):
    with scripted(allm, TOOL_CALL):
        first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=RESPONSE_TOOLS,
                                        max_output_tokens=60, reasoning={"effort": "none"}, stream=stream)
        if stream:
            events = list(first)
            kinds = [e.type for e in events]
            assert "response.function_call_arguments.delta" in kinds
            assert "response.function_call_arguments.done" in kinds
            first = events[-1].response
    [call] = first.output
    assert isinstance(call, ResponseFunctionToolCall)
    assert (call.name, json.loads(call.arguments), call.status) == ("get_weather", {"city": "Paris"}, "completed")
    assert call.call_id.startswith("call_")
    follow_up = [{"role": "user", "content": "Weather in Paris?"}, call.model_dump(exclude_none=True),
                 {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 22 C"}]
    with scripted(allm, "It is sunny."):
        second = client.responses.create(model=MODEL, input=follow_up, tools=RESPONSE_TOOLS, max_output_tokens=20,
                                         reasoning={"effort": "none"})
    assert second.output_text == "It is sunny."


def test_responses_previous_response_id_and_retrieve(client, allm):
    with scripted(allm, TOOL_CALL):
        first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=RESPONSE_TOOLS,
                                        max_output_tokens=60, reasoning={"effort": "none"})
    call = first.output[0]
    with scripted(allm, "It is sunny."):
        second = client.responses.create(
            model=MODEL, previous_response_id=first.id, tools=RESPONSE_TOOLS, max_output_tokens=20,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
            reasoning={"effort": "none"})
    assert second.output_text == "It is sunny." and second.previous_response_id == first.id
    # The stored conversation went into the prompt: the second prompt is the first one plus more.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    stored = client.responses.retrieve(second.id)
    assert (stored.id, stored.output_text) == (second.id, "It is sunny.")
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, previous_response_id="resp_nope", input="hi")
    assert e.value.body["param"] == "previous_response_id"
    unstored = client.responses.create(model=MODEL, input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_responses_json_schema_output(client):
    schema = {"type": "object", "properties": {"unit": {"enum": ["C", "F"]}}, "required": ["unit"],
              "additionalProperties": False}
    response = client.responses.create(
        model=MODEL, input="Which unit?", max_output_tokens=100, reasoning={"effort": "none"},
        text={"format": {"type": "json_schema", "name": "unit", "schema": schema, "strict": True}})
    assert json.loads(response.output_text)["unit"] in ("C", "F")
    assert response.text.format.type == "json_schema"


def test_responses_cut_by_max_output_tokens_is_incomplete(client, allm):
    with scripted(allm, "word " * 50):
        response = client.responses.create(model=MODEL, input="hi", max_output_tokens=5,
                                           reasoning={"effort": "none"})
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"


@pytest.mark.parametrize("kwargs, param", [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"temperature": 3}, "temperature"),
    ({"background": True}, "background"),
    ({"tool_choice": "sometimes", "tools": RESPONSE_TOOLS}, "tool_choice"),
])
def test_responses_bad_input_is_400_naming_the_field(client, kwargs, param):
    kwargs = {"model": MODEL, "input": "hi", "max_output_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**kwargs)
    assert param in e.value.body["message"]


def test_openapi_describes_the_new_routes(server):
    schema = httpx.get(f"{server}/openapi.json").json()
    assert "/v1/responses" in schema["paths"] and "/v1/models/{model_id}" in schema["paths"]
    assert {"Response", "ResponsesRequest", "ModelCard"} <= set(schema["components"]["schemas"])


def test_a_streamed_response_is_stored_before_it_completes(client, allm):
    with scripted(allm, "It is sunny."):
        events = list(client.responses.create(model=MODEL, input="hi", max_output_tokens=20, stream=True,
                                              reasoning={"effort": "none"}))
    final = events[-1].response
    stored = client.responses.retrieve(final.id)
    assert stored.output_text == final.output_text == "It is sunny."
    assert stored.model_dump() == final.model_dump()
