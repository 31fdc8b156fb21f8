"""LLM.chat on a tiny Qwen3: thinking, the thinking budget, tool calls, streaming.

The model's words are forced (`scripted`): the logits are biased so that the engine
emits a given text, which tests parsing and control apart from model quality.
"""


import pytest
from tiny import scripted

from qwenkit import SamplingParams
from qwenkit.chat.thinking import EARLY_STOP_TEXT

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]


def test_thinking_and_answer_are_apart(llm):
    with scripted(llm, "<think>\nThe user asks about weather.\n</think>\n\nIt is sunny."):
        out = llm.chat(USER, SamplingParams(temperature=0, max_tokens=64))
    assert out.reasoning_content == "The user asks about weather."
    assert out.content == "It is sunny."
    assert out.finish_reason == "stop"
    assert out.tool_calls == []
    assert out.usage.reasoning_tokens > 0
    assert out.usage.prompt_tokens > 10


def test_stream_concatenates_to_the_result(llm):
    text = "<think>\nLet me think: 2 + 2.\n</think>\n\nIt is 4. 你好"
    with scripted(llm, text):
        whole = llm.chat(USER, SamplingParams(temperature=0, max_tokens=64))
        chunks = list(llm.chat_stream(USER, SamplingParams(temperature=0, max_tokens=64)))
    assert "".join(c.delta.reasoning_content for c in chunks) == whole.reasoning_content
    assert "".join(c.delta.content for c in chunks) == whole.content
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage == whole.usage


def test_thinking_budget_cuts_at_exactly_n_tokens(llm):
    thought = " ".join(f"step{i}" for i in range(40))
    with scripted(llm, f"<think>\n{thought}\n</think>\n\nDone.") as (script,):
        out = llm.chat(USER, SamplingParams(temperature=0, max_tokens=200), thinking_budget=10)
        stream = list(llm.chat_stream(USER, SamplingParams(temperature=0, max_tokens=200), thinking_budget=10))
    early = llm.tokenizer.encode(EARLY_STOP_TEXT)
    expected_thinking = llm.tokenizer.decode(script[1:11])  # <think> then 10 thinking tokens
    assert out.reasoning_content.startswith(expected_thinking.strip("\n"))
    assert out.reasoning_content.endswith(
        "Considering the limited time by the user, I have to give the solution based on the thinking directly now."
    )
    assert out.content  # the model goes on to answer
    assert len(early) > 5
    assert "".join(c.delta.reasoning_content for c in stream) == out.reasoning_content


def test_thinking_budget_counts_from_a_think_after_whitespace(llm):
    """Output that starts "\\n<think>" is reasoning, and the budget caps it."""
    thought = " ".join(f"step{i}" for i in range(40))
    with scripted(llm, f"\n<think>\n{thought}\n</think>\n\nDone.") as (script,):
        out = llm.chat(USER, SamplingParams(temperature=0, max_tokens=200), thinking_budget=10)
    think = script.index(llm.tokenizer.token_to_id("<think>"))
    expected_thinking = llm.tokenizer.decode(script[think + 1 : think + 11])
    assert out.reasoning_content == expected_thinking.strip("\n") + EARLY_STOP_TEXT.removesuffix("\n</think>\n\n")
    assert out.content


def test_thinking_budget_zero_means_no_thinking(llm):
    with scripted(llm, "Straight answer."):
        out = llm.chat(USER, SamplingParams(temperature=0, max_tokens=32), thinking_budget=0)
    assert out.reasoning_content is None
    assert out.content == "Straight answer."


def test_no_think_switch_renders_thinking_off(llm):
    prepared = llm.prepare_chat([{"role": "user", "content": "Hi /no_think"}])
    assert not prepared.enable_thinking
    assert llm.tokenizer.decode(prepared.prompt_token_ids).endswith("<think>\n\n</think>\n\n")
    assert llm.prepare_chat([{"role": "user", "content": "Hi /think"}]).enable_thinking


def test_tool_calls_are_parsed_after_thinking(llm):
    text = ('<think>\nI should call <tool_call> maybe.\n</think>\n\n<tool_call>\n'
            '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    with scripted(llm, text):
        out = llm.chat(USER, SamplingParams(temperature=0, max_tokens=100), tools=TOOLS)
    assert out.finish_reason == "tool_calls"
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("get_weather", '{"city": "Paris"}')]
    assert "<tool_call>" in out.reasoning_content  # never parsed from inside thinking
    assert out.content is None


def test_malformed_tool_call_is_left_as_content(llm):
    with scripted(llm, '<tool_call>\n{"name": "get_weather", "arguments": {oops}\n</tool_call>'):
        out = llm.chat(USER, SamplingParams(temperature=0, max_tokens=100), tools=TOOLS, enable_thinking=False)
    assert out.tool_calls == []
    assert "oops" in out.content
    assert out.finish_reason == "stop"


def test_unclosed_thinking_gives_length_and_no_content(llm):
    with scripted(llm, "<think>\n" + "hmm " * 40):
        out = llm.chat(USER, SamplingParams(temperature=0, max_tokens=12))
    assert out.finish_reason == "length"
    assert out.content is None
    assert out.reasoning_content.startswith("hmm")


def test_bad_chat_input_names_the_field(llm):
    with pytest.raises(ValueError, match="thinking_budget"):
        llm.chat(USER, thinking_budget=-1)
    with pytest.raises(ValueError, match="tool_choice"):
        llm.chat(USER, tools=TOOLS, tool_choice="sometimes")
    with pytest.raises(ValueError, match="not among the tools"):
        llm.chat(USER, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="messages"):
        llm.chat([])


SCHEMA = {
    "type": "object",
    # Bounded values: the tiny random model must be able to finish the object.
    "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"enum": [1, 2, 3]},
                   "unit": {"enum": ["C", "F"]}},
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("thinking", [False, True])
def test_json_schema_output_is_enforced(llm, thinking):
    import json

    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA}}
    out = llm.chat(USER, SamplingParams(temperature=0, max_tokens=300), response_format=fmt,
                   enable_thinking=thinking, thinking_budget=8)
    jsonschema.validate(json.loads(out.content), SCHEMA)
    assert out.finish_reason == "stop"


def test_json_object_output_is_enforced(llm):
    import json

    # The script starts with text that is not JSON: the grammar overrides it.
    with scripted(llm, 'Sure! {"ok": true}'):
        out = llm.chat(USER, SamplingParams(temperature=0, max_tokens=300),
                       response_format={"type": "json_object"}, enable_thinking=False)
    assert isinstance(json.loads(out.content), dict)


def test_thinking_is_free_before_the_grammar_applies(llm):
    import json

    text = '<think>\nThe answer is not JSON yet.\n</think>\n\n{"a": 1}'
    with scripted(llm, text):
        out = llm.chat(USER, SamplingParams(temperature=0, max_tokens=300),
                       response_format={"type": "json_object"})
    assert out.reasoning_content == "The answer is not JSON yet."
    assert isinstance(json.loads(out.content), dict)


ENUM_TOOLS = [
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]},
    }},
]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_choice_forces_a_call(llm, choice):
    import json

    with scripted(llm, "I will just answer in words."):
        out = llm.chat(USER, SamplingParams(temperature=0, max_tokens=300), tools=ENUM_TOOLS,
                       tool_choice=choice, enable_thinking=False)
    assert out.finish_reason == "tool_calls"
    assert out.tool_calls
    if isinstance(choice, dict):
        assert [c.name for c in out.tool_calls] == ["get_weather"]
    for call in out.tool_calls:
        args = json.loads(call.arguments)
        assert call.name == "get_time" or args["city"] in ("Paris", "Oslo")


def test_invalid_schema_is_a_value_error(llm):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    with pytest.raises(ValueError, match="schema"):
        llm.chat(USER, response_format=fmt)


def test_call_written_as_json_text_is_a_tool_call(llm):
    """Small models write the call as bare JSON or a ```json fence instead of <tool_call>."""
    for text in ('{"name": "get_weather", "arguments": {"city": "Paris"}}',
                 '```json\n{\n  "name": "get_weather",\n  "arguments": {"city": "Paris"}\n}\n```'):
        with scripted(llm, text):
            out = llm.chat(USER, SamplingParams(temperature=0, max_tokens=100), tools=TOOLS, enable_thinking=False)
            chunks = list(llm.chat_stream(USER, SamplingParams(temperature=0, max_tokens=100), tools=TOOLS,
                                          enable_thinking=False))
        assert (out.content, out.finish_reason) == (None, "tool_calls")
        assert [(c.name, c.arguments) for c in out.tool_calls] == [("get_weather", '{"city": "Paris"}')]
        assert "".join(c.delta.content for c in chunks) == ""
        assert [t.name for c in chunks for t in c.delta.tool_calls] == ["get_weather"]
    with scripted(llm, '{"name": "get_weather", "arguments": {"city": "Paris"}}'):  # no tools offered: text
        out = llm.chat(USER, SamplingParams(temperature=0, max_tokens=100), enable_thinking=False)
    assert out.tool_calls == [] and out.content.startswith('{"name"')


def _history(arguments):
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]


def _prompt(tokenizer, messages):
    from qwenkit.chat.prepare import prepare_chat
    from qwenkit.chat.request import ChatRequest

    prepared = prepare_chat(tokenizer, ChatRequest(messages, tools=TOOLS, enable_thinking=False))
    return tokenizer.decode(prepared.prompt_token_ids)


@pytest.mark.parametrize("template", ["bundled", "checkpoint"])
def test_tool_call_arguments_reach_the_template_as_objects(llm, default_gguf, template):
    """OpenAI clients send earlier calls' arguments as a JSON string; the template must see
    the object (the Qwen2.5 template double-encoded the string, Qwen3's pasted it raw)."""
    if template == "bundled":
        tokenizer = llm.tokenizer
    else:
        from qwenkit.loader.gguf import GGUFCheckpoint
        from qwenkit.tokenizer import Tokenizer

        checkpoint = GGUFCheckpoint(default_gguf)
        tokenizer = Tokenizer(checkpoint.tokenizer_backend(), chat_template=checkpoint.chat_template,
                              **checkpoint.special_tokens())
    as_object = _prompt(tokenizer, _history({"city": "Paris"}))
    assert '"arguments": {"city": "Paris"}' in as_object
    assert _prompt(tokenizer, _history('{"city":"Paris"}')) == as_object


def test_bad_tool_call_arguments_name_the_field(llm):
    for bad in ("{not json", "[1, 2]", '"Paris"'):
        with pytest.raises(ValueError, match=r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"):
            llm.chat(_history(bad), SamplingParams(max_tokens=1), tools=TOOLS)
    assert "get_weather" in _prompt(llm.tokenizer, _history(""))  # a blank string is {}
