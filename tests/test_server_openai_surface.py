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
        raw = client.responses.with_raw_response.create(model=MODEL, input="What is the weather in Paris?",
                                                        instructions="Be brief.", max_output_tokens=60)
    response = raw.parse()
    assert response.status == "completed" and response.object == "response" and response.model == MODEL
    assert raw.headers["x-request-id"] == response.id  # the log and the header name it as the body does
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


# -- refusals before generating (issue 31) ---------------------------------------------


@pytest.fixture
def no_generation(allm, monkeypatch):
    """Fails a test whose request reaches the engine."""

    def refuse(*args, **kwargs):
        raise AssertionError("the request was generated")

    monkeypatch.setattr(allm, "chat_stream", refuse)


@pytest.mark.parametrize("body, param", [
    ('{"input": "hi", "metadata": {"a": "\\ud800"}}', "metadata.a"),
    ('{"input": "hi", "metadata": {"\\ud800": "a"}}', "metadata"),
    ('{"input": "hi", "previous_response_id": "resp_\\ud800"}', "previous_response_id"),
    ('{"input": "hi", "user": "\\udfff"}', "user"),
    ('{"input": "hi", "instructions": "a\\ud800"}', "instructions"),
    ('{"input": [{"role": "user", "content": [{"type": "input_text", "text": "\\ud800"}]}]}',
     "input[0].content[0].text"),
    ('{"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {"\\ud800": 1}}]}', "tools[0]"),
    ('{"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"title": "\\ud800"}}}}',
     "text.format.schema.title"),
    ('{"input": [{"type": "reasoning", "summary": 5}, {"role": "user", "content": "hi"}]}', "input[0].summary"),
    ('{"input": [{"type": "reasoning", "content": [5]}, {"role": "user", "content": "hi"}]}', "input[0].content[0]"),
    ('{"input": [{"type": "function_call_output", "call_id": 5, "output": "x"}]}', "input[0].call_id"),
    ('{"input": "hi", "store": "yes"}', "store"),
    ('{"input": "hi", "stream": 1}', "stream"),
    ('{"input": "hi", "metadata": {"a": 5}}', "metadata.a"),
])
def test_responses_refuse_bad_text_and_items_before_generating(server, no_generation, body, param):
    """A lone surrogate used to be a 500 after generation (the answer lost: the store could
    not encode it) or at the previous_response_id lookup; a reasoning item's summary of 5
    a TypeError; "store": "yes" was taken."""
    r = httpx.post(f"{server}/v1/responses", content=body.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert param in r.json()["error"]["message"]


def test_completions_max_tokens_null_is_the_default_16(client):
    """null meant no bound (a request generated for 73 s); OpenAI's legacy default is 16."""
    for extra in ({"max_tokens": None}, {}):
        reply = client.completions.create(model=MODEL, prompt="hi", extra_body={"ignore_eos": True, **extra})
        assert reply.usage.completion_tokens == 16 and reply.choices[0].finish_reason == "length"


# -- tools laid out alike on both routes (issue 31) -----------------------------------


@pytest.fixture
def prompts(allm, monkeypatch):
    """The ChatRequest and prompt token ids of each chat the engine prepares."""
    seen = []
    original = allm.llm.prepare_chat

    def prepare_chat(request, *args, **kwargs):
        prepared = original(request, *args, **kwargs)
        seen.append((request, prepared.prompt_token_ids))
        return prepared

    monkeypatch.setattr(allm.llm, "prepare_chat", prepare_chat)
    return seen


PYDANTIC_TOOL = {  # as the Agents SDK sends a @function_tool: a title, strict, no extra keys
    "name": "get_weather", "description": "Weather of a city", "strict": True,
    "parameters": {"properties": {"city": {"title": "City", "type": "string"}}, "required": ["city"],
                   "title": "get_weather_args", "type": "object", "additionalProperties": False},
}


@pytest.mark.parametrize("tool", [RESPONSE_TOOLS[0], {"type": "function", **PYDANTIC_TOOL}])
def test_responses_and_chat_render_the_same_prompt(client, prompts, tool):
    """The Responses route laid tools out as {name, parameters, description}, chat as
    {name, description, parameters, strict}: the same tool was a different prompt."""
    function = {key: value for key, value in tool.items() if key != "type"}
    client.responses.create(model=MODEL, instructions="Be brief.", input="Weather in Paris?", tools=[tool],
                            max_output_tokens=1)
    client.chat.completions.create(model=MODEL, max_tokens=1, tools=[{"type": "function", "function": function}],
                                   messages=[{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Weather in Paris?"}])
    (responses_request, responses_ids), (chat_request, chat_ids) = prompts
    assert responses_request.tools == chat_request.tools == [{"type": "function", "function": function}]
    assert responses_ids == chat_ids


def test_agents_sdk_responses_model_sends_tools_as_chat_does(server, allm, prompts):
    """The Agents SDK's default model (OpenAIResponsesModel) with a @function_tool: the
    request reaches the server, and the tool and prompt are what the chat route makes of
    the same conversation and tool."""
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Weather of a city."""
        return "sunny"

    model = agents.OpenAIResponsesModel(MODEL, openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused",
                                                                  max_retries=0))
    agent = agents.Agent(name="weather", instructions="Be brief.", tools=[get_weather], model=model,
                         model_settings=agents.ModelSettings(max_tokens=20))
    with scripted(allm, "It is sunny."):
        result = agents.Runner.run_sync(agent, "Weather in Paris?")
    assert result.final_output == "It is sunny."
    [(request, ids)] = prompts
    function = {"name": "get_weather", "description": get_weather.description,
                "parameters": get_weather.params_json_schema, "strict": True}
    assert request.tools == [{"type": "function", "function": function}]
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model=MODEL, max_tokens=1, tools=[{"type": "function", "function": function}],
                                   messages=request.messages)
    assert prompts[1][1] == ids


# -- stored responses and conversations (issue 31) ------------------------------------


def test_delete_input_items_and_cancel_a_stored_response(client, allm):
    first = client.responses.create(model=MODEL, input="hi", max_output_tokens=2)
    with scripted(allm, "It is sunny."):
        second = client.responses.create(
            model=MODEL, previous_response_id=first.id, max_output_tokens=20, reasoning={"effort": "none"},
            input=[{"role": "user", "content": "Weather?"},
                   {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "In Paris."}]}])
    items = client.responses.input_items.list(second.id)  # newest first, as OpenAI lists them
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [
        ("message", "user", "In Paris."), ("message", "user", "Weather?")]
    assert all(i.id.startswith("msg_") and i.status == "completed" for i in items.data)
    page = client.responses.input_items.list(second.id, order="asc", limit=1)
    assert ([i.content[0].text for i in page.data], page.has_more) == (["Weather?"], True)
    rest = client.responses.input_items.list(second.id, order="asc", after=page.last_id)
    assert ([i.content[0].text for i in rest.data], rest.has_more) == (["In Paris."], False)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.cancel(second.id)
    assert "background" in e.value.body["message"]
    deleted = client.responses.delete(second.id)  # the SDK returns None; the body is OpenAI's
    assert deleted is None
    for call in (client.responses.retrieve, client.responses.delete, client.responses.cancel,
                 client.responses.input_items.list):
        with pytest.raises(openai.NotFoundError):
            call(second.id)
    r = httpx.delete(f"{client.base_url}responses/{first.id}")
    assert r.json() == {"id": first.id, "object": "response", "deleted": True}


def test_input_tokens_counts_the_prompt(client):
    """POST /v1/responses/input_tokens was read as a response id (405)."""
    kwargs = {"model": MODEL, "instructions": "Be brief.", "input": "Weather in Paris?", "tools": RESPONSE_TOOLS}
    counted = client.responses.input_tokens.count(**kwargs)
    assert counted.object == "response.input_tokens"
    assert counted.input_tokens == client.responses.create(**kwargs, max_output_tokens=1).usage.input_tokens
    with pytest.raises(openai.BadRequestError):
        client.responses.input_tokens.count(model=MODEL, input=[{"type": "reasoning", "summary": 5}])


def test_conversations_with_the_sdk(client, allm, prompts):
    conversation = client.conversations.create(items=[{"role": "user", "content": "My name is Ada."}],
                                               metadata={"topic": "names"})
    assert conversation.object == "conversation" and conversation.id.startswith("conv_")
    assert client.conversations.retrieve(conversation.id).metadata == {"topic": "names"}
    assert client.conversations.update(conversation.id, metadata={"topic": "ada"}).metadata == {"topic": "ada"}
    with scripted(allm, "Hello Ada."):
        response = client.responses.create(model=MODEL, conversation=conversation.id, input="What is my name?",
                                           max_output_tokens=20, reasoning={"effort": "none"})
    assert response.output_text == "Hello Ada." and response.conversation.id == conversation.id
    assert [m["content"] for m in prompts[-1][0].messages] == ["My name is Ada.", "What is my name?"]
    items = list(client.conversations.items.list(conversation.id, order="asc"))
    assert [(i.role, i.content[0].text) for i in items] == [
        ("user", "My name is Ada."), ("user", "What is my name?"), ("assistant", "Hello Ada.")]
    assert items[2].id == response.output[0].id
    added = client.conversations.items.create(conversation.id, items=[
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}])
    assert [i.type for i in added.data] == ["function_call", "function_call_output"]
    one = client.conversations.items.retrieve(added.data[1].id, conversation_id=conversation.id)
    assert (one.type, one.output) == ("function_call_output", "sunny")
    assert client.conversations.items.delete(added.data[1].id, conversation_id=conversation.id).id == conversation.id
    assert len(list(client.conversations.items.list(conversation.id))) == 4
    with pytest.raises(openai.BadRequestError) as e:
        client.conversations.items.create(conversation.id, items=[{"type": "reasoning", "summary": 5}])
    assert "items[0].summary" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, conversation=conversation.id, previous_response_id=response.id,
                                input="hi")
    deleted = client.conversations.delete(conversation.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (conversation.id, True, "conversation.deleted")
    for call in (lambda: client.conversations.retrieve(conversation.id),
                 lambda: client.conversations.items.list(conversation.id),
                 lambda: client.responses.create(model=MODEL, conversation=conversation.id, input="hi")):
        with pytest.raises(openai.NotFoundError):
            call()


def test_agents_sdk_conversations_session(server, allm, prompts):
    """OpenAIConversationsSession keeps an Agents SDK run's history in /v1/conversations:
    the second run's prompt holds the first run's turn."""
    agents = pytest.importorskip("agents")
    from agents.memory import OpenAIConversationsSession

    agents.set_tracing_disabled(True)
    async_client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    agent = agents.Agent(name="a", model=agents.OpenAIResponsesModel(MODEL, async_client),
                         model_settings=agents.ModelSettings(max_tokens=20))
    session = OpenAIConversationsSession(openai_client=async_client)
    with scripted(allm, "Hello Ada.", "You are Ada."):
        agents.Runner.run_sync(agent, "My name is Ada.", session=session)
        result = agents.Runner.run_sync(agent, "What is my name?", session=session)
    assert result.final_output == "You are Ada."
    messages = prompts[-1][0].messages
    assert [(m["role"], m["content"]) for m in messages if m["role"] != "system"] == [
        ("user", "My name is Ada."), ("assistant", "Hello Ada."), ("user", "What is my name?")]
    items = list(openai.OpenAI(base_url=f"{server}/v1", api_key="unused").conversations.items.list(
        session.session_id, order="asc"))
    assert len(items) == 4


# -- legacy functions / function_call (issue 31) ---------------------------------------


FUNCTIONS = [TOOLS[0]["function"]]


@pytest.mark.parametrize("stream", [False, True])
def test_legacy_functions_are_honoured(client, allm, prompts, stream):
    """functions / function_call were silently ignored (the model then invented an answer):
    they are tools / tool_choice, and the call comes back as the legacy function_call."""
    with scripted(allm, TOOL_CALL):
        reply = client.chat.completions.create(model=MODEL, messages=USER, functions=FUNCTIONS, max_tokens=60,
                                               function_call={"name": "get_weather"}, stream=stream,
                                               extra_body={"enable_thinking": False})
        if stream:
            chunks = [c for c in reply if c.choices]
            assert not any(c.choices[0].delta.tool_calls for c in chunks)
            calls = [c.choices[0].delta.function_call for c in chunks if c.choices[0].delta.function_call]
            call = {"name": calls[0].name, "arguments": "".join(c.arguments or "" for c in calls)}
            finish = chunks[-1].choices[0].finish_reason
        else:
            message = reply.choices[0].message
            assert message.tool_calls is None
            call = message.function_call.model_dump()
            finish = reply.choices[0].finish_reason
    assert (call["name"], json.loads(call["arguments"]), finish) == ("get_weather", {"city": "Paris"},
                                                                     "function_call")
    request = prompts[0][0]
    assert request.tools == TOOLS and request.named_tool == "get_weather" and not request.parallel_tool_calls


def test_legacy_function_turns_render_as_tool_turns(client, allm, prompts):
    legacy = [*USER, {"role": "assistant", "content": None,
                      "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
              {"role": "function", "name": "get_weather", "content": "sunny"}]
    with scripted(allm, "It is sunny."):
        reply = client.chat.completions.create(model=MODEL, messages=legacy, functions=FUNCTIONS, max_tokens=20,
                                               extra_body={"enable_thinking": False})
        client.chat.completions.create(model=MODEL, messages=_round_trip('{"city": "Paris"}'), tools=TOOLS,
                                       max_tokens=20, extra_body={"enable_thinking": False})
    assert reply.choices[0].message.content == "It is sunny." and reply.choices[0].finish_reason == "stop"
    assert prompts[0][1] == prompts[1][1]  # the same prompt as the tools round trip


@pytest.mark.parametrize("extra, message", [
    ({"functions": FUNCTIONS, "tools": TOOLS}, "cannot be combined"),
    ({"function_call": "auto"}, "function_call needs functions"),
    ({"functions": FUNCTIONS, "function_call": {"name": "nope"}}, "nope"),
    ({"functions": FUNCTIONS, "function_call": "sometimes"}, "function_call"),
])
def test_bad_legacy_functions_are_400(client, extra, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, extra_body=extra)
    assert message in e.value.body["message"]
