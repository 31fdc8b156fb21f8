"""ChatRequest: every field checked once, where the request is built, with an error naming it."""

import dataclasses

import pytest

from qwenkit.chat.request import ChatRequest, chat_request
from qwenkit.sampling import SamplingParams

USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_defaults_and_derived_fields():
    request = ChatRequest(USER)
    assert (request.sampling_params, request.enable_thinking, request.thinking_budget, request.tools) == (
        None, True, None, None)
    assert (request.tool_choice, request.parallel_tool_calls, request.response_format) == ("auto", True, None)
    assert request.chat_template_kwargs == {}
    assert request.thinking and not request.needs_grammar and request.named_tool is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.thinking_budget = 3


def test_thinking_follows_the_soft_switch_and_a_zero_budget():
    assert not ChatRequest([{"role": "user", "content": "hi /no_think"}]).thinking
    assert not ChatRequest(USER, thinking_budget=0).thinking
    assert not ChatRequest([{"role": "user", "content": "hi /think"}], enable_thinking=False).thinking
    assert ChatRequest(USER, thinking_budget=5).thinking


def test_grammar_is_needed_for_forced_calls_and_json_answers():
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert ChatRequest(USER, tools=TOOLS, tool_choice=named).named_tool == "get_weather"
    assert ChatRequest(USER, tools=TOOLS, tool_choice="required").needs_grammar
    assert ChatRequest(USER, response_format={"type": "json_object"}).needs_grammar
    assert not ChatRequest(USER, response_format={"type": "text"}).needs_grammar
    assert ChatRequest(USER, tools=TOOLS, tool_choice="none").offered_tools is None
    assert ChatRequest(USER, tools=[]).tools is None


@pytest.mark.parametrize("fields, error", [
    ({"messages": []}, "messages must not be empty"),
    ({"messages": "hi"}, "messages must be a list"),
    ({"messages": ["hi"]}, r"messages\[0\] must be a message dict"),
    ({"sampling_params": {"temperature": 0}}, "sampling_params must be SamplingParams"),
    ({"enable_thinking": "no"}, "enable_thinking must be true or false"),
    ({"thinking_budget": -1}, "thinking_budget must be an integer >= 0"),
    ({"thinking_budget": True}, "thinking_budget must be an integer >= 0"),
    ({"thinking_budget": 2.5}, "thinking_budget must be an integer >= 0"),
    ({"tools": {"name": "f"}}, "tools must be a list"),
    ({"tools": ["f"]}, r"tools\[0\] must be a JSON-schema dict"),
    ({"tool_choice": "sometimes"}, "tool_choice must be one of none, auto, required"),
    ({"tool_choice": "required"}, "tool_choice 'required' needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "a named choice needs"),
    ({"parallel_tool_calls": 1}, "parallel_tool_calls must be true or false"),
    ({"response_format": {"type": "yaml"}}, "response_format.type must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs json_schema.schema"),
    ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs must not set enable_thinking"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs must not set tokenize"),
    ({"chat_template_kwargs": [("a", 1)]}, "chat_template_kwargs must be a dict"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]},
     r"messages\[0\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"),
])
def test_bad_fields_are_named(fields, error):
    with pytest.raises(ValueError, match=error):
        ChatRequest(**{"messages": USER, **fields})


def test_tool_call_arguments_are_parsed_once():
    messages = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": " "}}]}]
    request = ChatRequest(messages)
    assert [m["tool_calls"][0]["function"]["arguments"] for m in request.messages] == [{"a": 1}, {}]
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'  # the caller's dicts untouched


def test_keyword_arguments_build_the_request():
    params = SamplingParams(max_tokens=5)
    request = chat_request(USER, params, thinking_budget=3, tools=TOOLS, chat_template_kwargs={"a": 1}, b=2)
    assert request == ChatRequest(USER, params, thinking_budget=3, tools=TOOLS, chat_template_kwargs={"a": 1, "b": 2})
    assert chat_request(request) is request
    with pytest.raises(TypeError, match="thinking_budget"):
        chat_request(request, thinking_budget=4)
    with pytest.raises(TypeError, match="sampling_params"):
        chat_request(request, params)
    with pytest.raises(ValueError, match="thinking_budget"):
        chat_request(USER, thinking_budget=-2)
