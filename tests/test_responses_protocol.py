"""The Responses API translation, as pure functions: request -> chat call, chat chunks ->
stream events and response object, each event and object checked against the `openai`
SDK's own pydantic types."""

import json

import pytest
from pydantic import TypeAdapter

from qwenkit.chat.types import ChatChunk, ChatDelta, ToolCallDelta, Usage
from qwenkit.server import responses_protocol as rp
from qwenkit.server.response_store import ResponseStore

sdk = pytest.importorskip("openai.types.responses")
STREAM_EVENT = TypeAdapter(sdk.ResponseStreamEvent)

TOOL = {"type": "function", "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def request(**fields):
    return rp.ResponsesRequest.model_validate({"model": "m", "input": "hi", **fields})


# -- request -> chat call -------------------------------------------------------------


def test_string_input_and_instructions():
    call = rp.responses_call(request(instructions="Be brief.", temperature=0.5, max_output_tokens=7))
    assert call.request.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert call.conversation == [{"role": "user", "content": "hi"}]  # instructions are not carried over
    assert (call.request.sampling_params.temperature, call.request.sampling_params.max_tokens) == (0.5, 7)
    assert call.request.enable_thinking is True and call.request.tool_choice == "auto"


def test_items_become_chat_messages():
    items = [
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather "},
                                                         {"type": "input_text", "text": "in Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Call."}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "rain"}]},
    ]
    assert rp.input_messages(items) == [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Call.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    ]


def test_a_call_without_a_message_before_it_is_its_own_assistant_turn():
    items = [{"role": "user", "content": "x"},
             {"type": "reasoning", "summary": [{"type": "summary_text", "text": "think"}]},
             {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]
    assert rp.input_messages(items)[1] == {"role": "assistant", "content": "", "reasoning_content": "think",
                                           "tool_calls": [{"id": "c", "type": "function",
                                                           "function": {"name": "f", "arguments": "{}"}}]}


def test_previous_conversation_comes_first():
    previous = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    call = rp.responses_call(request(instructions="I.", input="c"), previous)
    assert [m["content"] for m in call.request.messages] == ["I.", "a", "b", "c"]
    assert [m["content"] for m in call.conversation] == ["a", "b", "c"]


def test_tools_choice_format_and_reasoning():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    call = rp.responses_call(request(
        tools=[TOOL], tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
        text={"format": {"type": "json_schema", "name": "out", "schema": schema, "strict": True}},
        reasoning={"effort": "none"}))
    chat = call.request
    assert chat.tools == [{"type": "function", "function": {
        "name": "get_weather", "parameters": TOOL["parameters"], "description": "Weather of a city"}}]
    assert chat.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert chat.parallel_tool_calls is False
    assert chat.response_format == {"type": "json_schema",
                                    "json_schema": {"name": "out", "schema": schema, "strict": True}}
    assert chat.enable_thinking is False
    assert rp.responses_call(request(text={"format": {"type": "json_object"}})).request.response_format == {
        "type": "json_object"}
    assert rp.responses_call(request(reasoning={"effort": "high"})).request.enable_thinking is True


@pytest.mark.parametrize("fields, message", [
    ({"input": None}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "assistant", "content": "x"}]}, "user message"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
    ({"input": [{"type": "computer_call_output"}]}, "input[0].type"),
    ({"tools": [{"type": "file_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].name"),
    ({"tool_choice": {"type": "allowed_tools"}}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"conversation": "conv_1", "previous_response_id": "resp_1"}, "conversation and previous_response_id"),
    ({"conversation": {"id": 5}}, "conversation must be"),
    ({"prompt": {"id": "p"}}, "prompt"),
    ({"input": [{"type": "reasoning", "summary": 5}]}, "input[0].summary"),
    ({"input": [{"type": "reasoning", "content": [{"text": "x"}], "summary": 5}]}, "input[0].summary"),
    ({"input": [{"type": "reasoning", "summary": [{"type": "summary_text"}]}]}, "input[0].summary[0]"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"background": True}, "background"),
])
def test_bad_requests_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        rp.responses_call(request(**fields))


# -- chat chunks -> events and response -----------------------------------------------


def chunks_of_a_turn():
    return [
        ChatChunk(0, ChatDelta(reasoning_content="Need ")),
        ChatChunk(0, ChatDelta(reasoning_content="weather.")),
        ChatChunk(0, ChatDelta(content="Let me ")),
        ChatChunk(0, ChatDelta(content="check.")),
        ChatChunk(0, ChatDelta(tool_calls=[ToolCallDelta(0, "call_a", "get_weather", '{"city": "Paris"}')])),
        ChatChunk(0, ChatDelta(tool_calls=[ToolCallDelta(1, "call_b", "get_weather", '{"city": ')])),
        ChatChunk(0, ChatDelta(tool_calls=[ToolCallDelta(1, None, None, '"Oslo"}')]), finish_reason="tool_calls",
                  usage=Usage(prompt_tokens=20, completion_tokens=30, reasoning_tokens=5, cached_tokens=16)),
    ]


def run(req, chunks):
    builder = rp.ResponseBuilder("resp_1", "m", req)
    events = builder.start()
    for chunk in chunks:
        events += builder.add(chunk)
    events += builder.finish()
    return builder, events


def test_events_are_the_sdks_types_in_order():
    builder, events = run(request(tools=[TOOL]), chunks_of_a_turn())
    parsed = [STREAM_EVENT.validate_python(e) for e in events]
    assert [e.sequence_number for e in parsed] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert [e["output_index"] for e in done] == [0, 1, 2, 3]
    assert done[3]["item"]["arguments"] == '{"city": "Oslo"}'
    final = sdk.Response.model_validate(events[-1]["response"])
    assert final.status == "completed"
    assert [item.type for item in final.output] == ["reasoning", "message", "function_call", "function_call"]
    assert final.output[0].content[0].text == "Need weather."
    assert final.output_text == "Let me check."
    assert [(c.call_id, json.loads(c.arguments)) for c in final.output[2:]] == [
        ("call_a", {"city": "Paris"}), ("call_b", {"city": "Oslo"})]
    assert final.usage.input_tokens_details.cached_tokens == 16
    assert final.usage.output_tokens_details.reasoning_tokens == 5
    assert final.usage.total_tokens == 50
    assert final.tools[0].name == "get_weather"
    assert builder.final().model_dump(mode="json", by_alias=True) == events[-1]["response"]


def test_the_assistant_message_stored_for_later_turns():
    builder, _ = run(request(tools=[TOOL]), chunks_of_a_turn())
    assert builder.assistant_message() == {
        "role": "assistant", "content": "Let me check.", "reasoning_content": "Need weather.", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        ]}
    # fed back as input items, it is the same conversation
    items = [item.model_dump(exclude_none=True) for item in builder.final().output]
    assert rp.input_messages([{"role": "user", "content": "x"}, *items])[1] == builder.assistant_message()


def test_length_is_an_incomplete_response():
    chunks = [ChatChunk(0, ChatDelta(content="a b c")), ChatChunk(0, ChatDelta(), finish_reason="length",
                                                                  usage=Usage(3, 5))]
    _, events = run(request(max_output_tokens=5), chunks)
    assert events[-1]["type"] == "response.incomplete"
    final = sdk.Response.model_validate(events[-1]["response"])
    assert (final.status, final.incomplete_details.reason, final.output[0].status) == (
        "incomplete", "max_output_tokens", "incomplete")
    STREAM_EVENT.validate_python(events[-1])


def test_the_response_echoes_the_request():
    req = request(instructions="I.", tool_choice="required", tools=[TOOL], temperature=0.3, top_p=0.9,
                  metadata={"k": "v"}, text={"format": {"type": "json_object"}}, store=False)
    final = sdk.Response.model_validate(run(req, [ChatChunk(0, ChatDelta(content="{}"), finish_reason="stop",
                                                            usage=Usage(1, 1))])[0].final().model_dump(mode="json"))
    assert (final.instructions, final.tool_choice, final.temperature, final.top_p) == ("I.", "required", 0.3, 0.9)
    assert final.metadata == {"k": "v"} and final.text.format.type == "json_object"
    assert final.model_extra["store"] is False
    assert rp.ResponseBuilder("r", "m", request()).final().text.model_dump()["format"] == {"type": "text"}


def test_sse_names_the_event():
    assert rp.sse({"type": "response.created", "sequence_number": 0}) == (
        b'event: response.created\ndata: {"type":"response.created","sequence_number":0}\n\n')


# -- the store ------------------------------------------------------------------------


def test_store_round_trip_and_lazy_file(tmp_path):
    path = tmp_path / "sub" / "responses.sqlite3"
    store = ResponseStore(path)
    assert not path.exists()  # nothing until the first use
    assert store.conversation("resp_x") is None
    store.save({"id": "resp_1", "output": []}, [{"role": "user", "content": "héllo"}])
    again = ResponseStore(path)
    assert again.response("resp_1") == {"id": "resp_1", "output": []}
    assert again.conversation("resp_1") == [{"role": "user", "content": "héllo"}]
    assert again.delete("resp_1") and not again.delete("resp_1")
    assert again.response("resp_1") is None


def test_a_store_made_before_input_items_gains_the_column(tmp_path):
    import sqlite3

    path = tmp_path / "responses.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE responses (id TEXT PRIMARY KEY, created_at REAL NOT NULL, response TEXT NOT NULL, "
                   "conversation TEXT NOT NULL)")
        db.execute("INSERT INTO responses VALUES ('resp_old', 0, '{}', '[]')")
    store = ResponseStore(path)
    assert store.input_items("resp_old") == []
    store.save({"id": "resp_new"}, [], [{"id": "msg_1"}])
    assert store.input_items("resp_new") == [{"id": "msg_1"}]


def test_conversations_in_the_store(tmp_path):
    from qwenkit.server.response_store import DuplicateItem

    store = ResponseStore(tmp_path / "r.sqlite3")
    made = store.create_conversation("conv_1", {"k": "v"}, [{"id": "a", "x": 1}])
    assert made == {"id": "conv_1", "object": "conversation", "created_at": made["created_at"], "metadata": {"k": "v"}}
    assert store.add_items("conv_1", [{"id": "b"}, {"id": "c"}]) and not store.add_items("conv_2", [{"id": "d"}])
    with pytest.raises(DuplicateItem):
        store.add_items("conv_1", [{"id": "e"}, {"id": "b"}])  # all or nothing
    assert [i["id"] for i in store.items("conv_1")] == ["a", "b", "c"] and store.items("conv_2") is None
    assert store.delete_item("conv_1", "b") and not store.delete_item("conv_1", "b")
    assert store.item("conv_1", "c") == {"id": "c"} and store.item("conv_1", "b") is None
    assert store.update_conversation("conv_1", {})["metadata"] == {} and store.update_conversation("x", {}) is None
    assert store.delete_conversation("conv_1") and not store.delete_conversation("conv_1")
    assert store.items("conv_1") is None and store.item("conv_1", "c") is None


def test_listed_items_and_pages():
    from qwenkit.server.errors import APIError

    items = rp.listed_items([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "id": "msg_a"},
                             {"type": "function_call_output", "call_id": "c", "output": "x"},
                             {"type": "reasoning", "summary": []}])
    assert items[0]["id"].startswith("msg_") and items[1]["id"] == "msg_a"
    assert items[0]["content"] == [{"type": "input_text", "text": "hi"}]
    assert items[1]["content"] == [{"type": "output_text", "text": "yo", "annotations": []}]
    assert items[2]["status"] == "completed" and items[3] == {"id": items[3]["id"], "summary": [], "type": "reasoning"}
    assert rp.input_messages(items) == rp.input_messages(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
         {"type": "function_call_output", "call_id": "c", "output": "x"}, {"type": "reasoning", "summary": []}])
    for item in items:
        TypeAdapter(sdk.ResponseItem).validate_python(item)  # the SDK's own listed-item types
    listed = [{"id": str(i)} for i in range(5)]
    page = rp.item_page(listed, order="desc", limit=2, after="3")
    assert ([i["id"] for i in page.data], page.first_id, page.last_id, page.has_more) == (["2", "1"], "2", "1", True)
    assert rp.item_page(listed, order="asc", limit=9, after=None).has_more is False
    assert rp.item_page([], order="asc", limit=9, after=None).first_id is None
    with pytest.raises(APIError, match="after") as e:
        rp.item_page(listed, order="asc", limit=2, after="9")
    assert e.value.status == 404


def test_check_unicode_names_the_path():
    from qwenkit.server.errors import APIError

    rp.check_unicode({"a": ["ok", {"b": "fine"}]})
    for value, param in [({"a": [1, {"b": "\ud800"}]}, "a[1].b"), ({"\udfff": 1}, "\\udfff"), ("\ud800", None)]:
        with pytest.raises(APIError) as e:
            rp.check_unicode(value)
        assert e.value.status == 400 and e.value.param == param and "not valid Unicode" in e.value.message
