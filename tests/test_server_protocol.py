"""The server's protocol modules as pure functions: no model, no HTTP."""

import asyncio
import json

import pytest

pytest.importorskip("fastapi")

from qwenkit.chat.types import ChatChunk, ChatDelta, ToolCallDelta, Usage  # noqa: E402
from qwenkit.engine.llm_engine import SequenceUpdate, TokenOutput  # noqa: E402
from qwenkit.errors import ContextLengthError  # noqa: E402
from qwenkit.server import dashscope_protocol as ds  # noqa: E402
from qwenkit.server import openai_protocol as oa  # noqa: E402
from qwenkit.server.errors import APIError, bad_request, dashscope_error, openai_error, validation_message  # noqa: E402
from qwenkit.server.limits import RequestSlots  # noqa: E402

USER = [{"role": "user", "content": "hi"}]


def chat_request(**fields) -> oa.ChatCompletionRequest:
    return oa.ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def chunk(index=0, *, reasoning="", content="", tools=(), finish=None, usage=None) -> ChatChunk:
    return ChatChunk(index, ChatDelta(reasoning, content, list(tools)), finish, usage)


# -- OpenAI requests -----------------------------------------------------------------


def test_chat_call_defaults():
    call = oa.chat_call(chat_request())
    assert call.request.messages == USER
    assert call.request.sampling_params.max_tokens is None  # until the context ends
    assert call.request.enable_thinking is True and call.request.tool_choice == "auto"
    assert not call.include_usage


def test_chat_call_options():
    call = oa.chat_call(chat_request(
        max_completion_tokens=7, max_tokens=3, top_k=5, min_p=0.1, repetition_penalty=1.1, seed=3, n=2,
        stop="END", chat_template_kwargs={"enable_thinking": False, "thinking_budget": 9, "custom": 1},
        stream_options={"include_usage": True}, response_format={"type": "json_object"},
    ))
    p = call.request.sampling_params
    assert (p.max_tokens, p.top_k, p.min_p, p.repetition_penalty, p.seed, p.n, p.stop) == (
        7, 5, 0.1, 1.1, 3, 2, ("END",))
    assert call.request.enable_thinking is False and call.request.thinking_budget == 9
    assert call.request.chat_template_kwargs == {"custom": 1}
    assert call.request.response_format == {"type": "json_object"}
    assert call.include_usage
    # Top-level fields win over chat_template_kwargs.
    call = oa.chat_call(chat_request(enable_thinking=True, chat_template_kwargs={"enable_thinking": False}))
    assert call.request.enable_thinking is True


def test_messages_are_normalized():
    req = chat_request(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                               "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "42"},
    ])
    messages = oa.chat_call(req).request.messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[1]["content"] == "ab" and messages[2]["content"] == ""
    assert messages[2]["tool_calls"][0]["function"]["name"] == "f" and messages[3]["tool_call_id"] == "c"


def test_bad_values_raise_naming_the_field():
    with pytest.raises(ValueError, match="messages\\[0\\].content"):
        oa.chat_call(chat_request(messages=[{"role": "user", "content": [{"type": "image_url"}]}]))
    with pytest.raises(ValueError, match="top_p"):
        oa.chat_call(chat_request(top_p=5))
    with pytest.raises(ValueError, match="top_logprobs"):
        oa.chat_call(chat_request(top_logprobs=2))  # needs logprobs: true
    with pytest.raises(ValueError, match="top_logprobs"):
        oa.chat_call(chat_request(logprobs=True, top_logprobs=21))


def test_completion_call():
    req = oa.CompletionRequest.model_validate({"model": "m", "prompt": ["hello"], "logprobs": 2})
    call = oa.completion_call(req)
    assert call.prompt == "hello" and call.params.max_tokens == 16
    assert call.params.logprobs and call.params.top_logprobs == 2
    assert oa.completion_call(oa.CompletionRequest(prompt=[1, 2, 3])).prompt == [1, 2, 3]
    with pytest.raises(ValueError, match="prompt"):
        oa.completion_call(oa.CompletionRequest(prompt=["a", "b"]))


# -- OpenAI responses ----------------------------------------------------------------


def test_stream_encoder():
    enc = oa.ChatStreamEncoder("id1", "m", include_usage=True)
    first = enc.encode(chunk(reasoning="hmm"))
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first[1]["choices"][0]["delta"] == {"reasoning_content": "hmm", "reasoning": "hmm"}
    assert all(c["usage"] is None for c in first)
    assert enc.encode(chunk()) == []  # nothing new: nothing sent
    call = ToolCallDelta(0, "call_1", "f", '{"a"')
    last = enc.encode(chunk(tools=[call], finish="tool_calls", usage=Usage(5, 3, reasoning_tokens=1)))
    assert last[0]["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}]
    assert last[0]["choices"][0]["finish_reason"] == "tool_calls"
    assert last[1]["choices"] == [] and last[1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 1
    assert oa.sse({"a": 1}) == b'data: {"a":1}\n\n' and oa.SSE_DONE == b"data: [DONE]\n\n"
    without = oa.ChatStreamEncoder("id1", "m").encode(chunk(content="x", finish="stop", usage=Usage(1, 1)))
    assert len(without) == 2 and "usage" not in without[1]


def test_accumulator_joins_pieces_per_choice():
    acc = oa.ChatAccumulator()
    acc.add(chunk(0, reasoning="r", content="a"))
    acc.add(chunk(1, content="b", finish="length"))
    acc.add(chunk(0, tools=[ToolCallDelta(0, "call_1", "f", '{"x": ')]))
    acc.add(chunk(0, tools=[ToolCallDelta(0, None, None, "1}")], finish="tool_calls", usage=Usage(4, 6)))
    out = acc.response(id="x", model="m", created=1)
    m0, m1 = (c["message"] for c in out["choices"])
    assert m0["reasoning_content"] == "r" and m0["content"] == "a"
    assert m0["tool_calls"] == [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    assert m1["content"] == "b" and m1["reasoning_content"] is None and "tool_calls" not in m1
    assert [c["finish_reason"] for c in out["choices"]] == ["tool_calls", "length"]
    assert out["usage"]["total_tokens"] == 10


# A call streamed in fragments whose id and name come late (not on the first piece), and a
# second call whose every piece repeats them: both protocols give the same whole calls.
FRAGMENTED = [ToolCallDelta(0, None, None, '{"x"'), ToolCallDelta(0, "call_1", "f", ": 1"),
              ToolCallDelta(1, "call_2", "g", "{}"), ToolCallDelta(0, None, None, "}"),
              ToolCallDelta(1, "call_2", "g", "")]
WHOLE = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
         {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]


def test_both_protocols_gather_fragmented_tool_calls_alike():
    acc = oa.ChatAccumulator()
    dashscope = ds.GenerationEncoder("rid", "message", incremental_output=True)
    streamed = ds.GenerationEncoder("rid", "message", incremental_output=False)
    for i, piece in enumerate(FRAGMENTED):
        finish = "tool_calls" if i == len(FRAGMENTED) - 1 else None
        for gather in (acc.add, dashscope.encode):
            gather(chunk(tools=[piece], finish=finish))
        last_event = streamed.encode(chunk(tools=[piece], finish=finish))
    assert acc.response(id="x", model="m")["choices"][0]["message"]["tool_calls"] == WHOLE
    indexed = [{"index": i, **call} for i, call in enumerate(WHOLE)]
    assert dashscope.response()["output"]["choices"][0]["message"]["tool_calls"] == indexed
    assert last_event["output"]["choices"][0]["message"]["tool_calls"] == indexed


def test_a_late_id_replaces_the_one_made_up_for_the_call_so_far():
    enc = ds.GenerationEncoder("rid", "message", incremental_output=False)
    first = enc.encode(chunk(tools=[ToolCallDelta(0, None, None, "{")]))["output"]["choices"][0]["message"]
    made_up = first["tool_calls"][0]["id"]
    assert made_up.startswith("call_") and first["tool_calls"][0]["function"]["name"] == ""
    again = enc.encode(chunk(tools=[ToolCallDelta(0, None, None, "")]))["output"]["choices"][0]["message"]
    assert again["tool_calls"][0]["id"] == made_up  # the same each time until the real one comes
    enc.encode(chunk(tools=[ToolCallDelta(0, "call_9", "f", "}")], finish="tool_calls"))
    assert enc.response()["output"]["choices"][0]["message"]["tool_calls"][0]["id"] == "call_9"


def test_completion_encoder_logprobs():
    enc = oa.CompletionEncoder("c", "m", decode=lambda i: f"<{i}>")
    update = SequenceUpdate("r", 0, [TokenOutput(1, "He", -0.5, [(1, -0.5), (2, -1.0)]),
                                     TokenOutput(2, "llo", -0.1, [(2, -0.1)])], "length", 7, 0)
    chunk_ = enc.add(update)
    lp = chunk_["choices"][0]["logprobs"]
    assert lp["tokens"] == ["He", "llo"] and lp["text_offset"] == [0, 2]
    assert lp["top_logprobs"][0] == {"<1>": -0.5, "<2>": -1.0}
    out = enc.response()
    assert out["choices"][0]["text"] == "Hello" and out["usage"]["prompt_tokens"] == 7


def test_chat_logprobs_request_and_shapes():
    params = oa.chat_call(chat_request(logprobs=True, top_logprobs=2)).request.sampling_params
    assert params.logprobs and params.top_logprobs == 2
    assert not oa.chat_call(chat_request()).request.sampling_params.logprobs
    decode = oa.token_decoder(lambda ids: {1: "é", 2: "b", 3: "c"}[ids[0]])
    tokens = [TokenOutput(1, "é", -0.25, [(1, -0.25), (2, -2.0)]), TokenOutput(3, "", None, None)]
    lp_chunk = ChatChunk(0, ChatDelta("", "é", []), logprobs=tokens)
    # Streamed: each chunk carries its own tokens' entries, even one with no text.
    enc = oa.ChatStreamEncoder("id1", "m", decode=decode)
    (_, sent) = enc.encode(lp_chunk)
    assert sent["choices"][0]["logprobs"] == {"content": [
        {"token": "é", "logprob": -0.25, "bytes": [195, 169], "top_logprobs": [
            {"token": "é", "logprob": -0.25, "bytes": [195, 169]}, {"token": "b", "logprob": -2.0, "bytes": [98]}]},
        {"token": "c", "logprob": 0.0, "bytes": [99], "top_logprobs": []},  # forced: no logprob of its own
    ]}
    (quiet,) = enc.encode(ChatChunk(0, ChatDelta(), logprobs=[TokenOutput(2, "", -1.0, [])]))
    assert quiet["choices"][0]["delta"] == {} and len(quiet["choices"][0]["logprobs"]["content"]) == 1
    assert oa.ChatStreamEncoder("id1", "m").encode(chunk(content="x"))[1]["choices"][0]["logprobs"] is None
    # Not streamed: all of a choice's tokens; null when not asked.
    acc = oa.ChatAccumulator(decode=decode)
    acc.add(lp_chunk)
    acc.add(ChatChunk(0, ChatDelta(), "stop", Usage(1, 3), logprobs=[TokenOutput(2, "", -1.0, [])]))
    content = acc.response(id="x", model="m")["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == ["é", "c", "b"]
    plain = oa.ChatAccumulator()
    plain.add(chunk(content="x", finish="stop"))
    assert plain.response(id="x", model="m")["choices"][0]["logprobs"] is None
    # DashScope: parameters.logprobs -> output.choices[i].logprobs in the same shape.
    req = ds.GenerationRequest.model_validate({"input": {"prompt": "hi"}, "parameters": {
        "result_format": "message", "logprobs": True, "top_logprobs": 2}})
    call = ds.generation_call(req)
    assert call.request.sampling_params.logprobs and call.request.sampling_params.top_logprobs == 2
    with pytest.raises(ValueError, match="result_format"):
        ds.generation_call(ds.GenerationRequest.model_validate(
            {"input": {"prompt": "hi"}, "parameters": {"logprobs": True}}))
    gen = ds.GenerationEncoder("rid", "message", incremental_output=False, decode=decode)
    first = gen.encode(lp_chunk)
    assert len(first["output"]["choices"][0]["logprobs"]["content"]) == 2
    last = gen.encode(ChatChunk(0, ChatDelta(), "stop", Usage(1, 3), logprobs=[TokenOutput(2, "", -1.0, [])]))
    assert len(last["output"]["choices"][0]["logprobs"]["content"]) == 3  # cumulative, like the text
    assert gen.response()["output"]["choices"][0]["logprobs"]["content"][2]["token"] == "b"
    assert "logprobs" not in ds.GenerationEncoder("rid").encode(chunk(content="x"))["output"]["choices"][0]


# -- DashScope -----------------------------------------------------------------------


def test_generation_call():
    req = ds.GenerationRequest.model_validate({"model": "m", "input": {"prompt": "hi"}, "parameters": {
        "result_format": "message", "incremental_output": True, "enable_thinking": False, "top_k": 4,
        "stop": [[7]], "user_agent": "sdk",
    }})
    call = ds.generation_call(req)
    assert call.request.messages == USER and call.result_format == "message" and call.incremental_output
    assert call.request.sampling_params.stop_token_ids == (7,) and call.request.sampling_params.top_k == 4
    assert call.request.enable_thinking is False
    with pytest.raises(ValueError, match="n > 1"):
        ds.generation_call(ds.GenerationRequest.model_validate(
            {"input": {"prompt": "hi"}, "parameters": {"n": 2}}))
    with pytest.raises(ValueError, match="input.messages"):
        ds.generation_call(ds.GenerationRequest.model_validate({"input": {}}))


@pytest.mark.parametrize("incremental", [True, False])
def test_generation_encoder_stream(incremental):
    enc = ds.GenerationEncoder("rid", "message", incremental)
    a = enc.encode(chunk(reasoning="r"))
    b = enc.encode(chunk(content="x"))
    c = enc.encode(chunk(content="y", finish="stop", usage=Usage(3, 4, reasoning_tokens=1)))
    messages = [e["output"]["choices"][0]["message"] for e in (a, b, c)]
    if incremental:
        assert [m["content"] for m in messages] == ["", "x", "y"]
    else:
        assert [m["content"] for m in messages] == ["", "x", "xy"]
        assert messages[-1]["reasoning_content"] == "r"
    assert [e["output"]["choices"][0]["finish_reason"] for e in (a, b, c)] == ["null", "null", "stop"]
    assert "usage" not in a
    assert c["usage"] == {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7,
                          "output_tokens_details": {"reasoning_tokens": 1},
                          "prompt_tokens_details": {"cached_tokens": 0}}
    assert c["request_id"] == "rid"


def test_generation_encoder_text_response():
    enc = ds.GenerationEncoder("rid", "text")
    enc.encode(chunk(content="hello", finish="stop", usage=Usage(1, 1)))
    out = enc.response()
    assert out["output"] == {"text": "hello", "finish_reason": "stop"}


def test_dashscope_sse_event():
    assert ds.sse_event(3, {"a": "é"}) == 'id:3\nevent:result\n:HTTP_STATUS/200\ndata:{"a":"é"}\n\n'.encode()
    assert ds.sse_event(4, {}, status=400).startswith(b"id:4\nevent:error\n:HTTP_STATUS/400\n")


# -- errors and limits ---------------------------------------------------------------


def test_error_shapes():
    error = bad_request(ValueError("top_p must be in (0, 1], got 5"), oa.REQUEST_FIELDS)
    assert openai_error(error) == {"error": {"message": "top_p must be in (0, 1], got 5",
                                             "type": "invalid_request_error", "param": "top_p", "code": None}}
    assert dashscope_error(error, "r") == {"code": "InvalidParameter", "message": error.message, "request_id": "r"}
    assert bad_request(ContextLengthError("the prompt is 9 tokens")).code == "context_length_exceeded"
    assert bad_request(ValueError("something odd")).param is None


def test_validation_message_names_the_field():
    message, param = validation_message([{"loc": ("body", "messages", 0, "role"), "msg": "Input should be 'user'",
                                          "type": "literal_error"}])
    assert param == "messages.0.role" and message.startswith("messages.0.role:")
    message, param = validation_message([{"loc": ("body", "messages"), "msg": "Field required", "type": "missing"}])
    assert message == "messages is required"


def test_request_slots():
    async def main():
        slots = RequestSlots(1, 1)
        await slots.acquire()
        waiter = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        assert slots.num_waiting == 1
        with pytest.raises(APIError) as e:
            await slots.acquire()
        assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"}
        slots.release()
        await waiter
        assert (slots.num_running, slots.num_waiting) == (1, 0)

    asyncio.run(main())


def test_json_round_trip_of_encoded_chunks():
    enc = oa.ChatStreamEncoder("id", "m")
    for out in enc.encode(chunk(content="你好", finish="stop")):
        assert json.loads(oa.sse(out)[len(b"data: "):]) == out
