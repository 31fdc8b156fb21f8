"""ChatTemplate renders the Qwen3 template byte for byte as transformers does."""

import json

import pytest

from qwenkit.chat.template import ChatTemplate, qwen3_template
from qwenkit.errors import QwenkitError

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市天气 (weather for a city)",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "城市名, e.g. 北京"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "date": {"type": "string"},
                            "hours": {"type": "array", "items": {"type": "integer"}},
                        },
                        "required": ["date"],
                    },
                },
            },
            "required": ["city"],
        },
    },
}
# A bare schema (no OpenAI wrapper), key order deliberately unsorted: tojson must keep it.
SEARCH_TOOL = {
    "name": "search",
    "description": "Search the web <b>&</b> return snippets",
    "parameters": {
        "type": "object",
        "properties": {"query": {"type": "string"}, "limit": {"type": "integer", "default": 5}},
    },
}

THINKING_HISTORY = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "1+1=?"},
    {"role": "assistant", "content": "<think>\nsimple sum\n</think>\n\n等于 2。"},
    {"role": "user", "content": "And 2+2?"},
    {"role": "assistant", "content": "4.", "reasoning_content": "\nadd again\n"},
    {"role": "user", "content": "Now 3+3, think hard 🤔"},
]

TOOL_CONVERSATION = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "北京和上海的天气怎么样？"},
    {
        "role": "assistant",
        "content": "<think>\nTwo cities, two calls.\n</think>\n\nLet me check.",
        "tool_calls": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": {"city": "北京", "days": [{"date": "today", "hours": [9, 12]}]},
                },
            },
            {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "上海"})}},
        ],
    },
    {"role": "tool", "content": '{"temp": 21, "sky": "晴"}'},
    {"role": "tool", "content": '{"temp": 25, "sky": "多云"}'},
    {"role": "assistant", "content": "北京 21°C 晴，上海 25°C 多云。"},
    {"role": "user", "content": "Thanks! Search for more."},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "search", "arguments": {"query": "天气 预报", "limit": 3}}}],
    },
    {"role": "tool", "content": "<result>sunny all week</result>"},
]

CASES = {
    "plain_user": dict(messages=[{"role": "user", "content": "Hello!"}]),
    "system_prompt": dict(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好，世界"}]
    ),
    "thinking_off": dict(messages=[{"role": "user", "content": "Quick: capital of France?"}], enable_thinking=False),
    "thinking_on": dict(messages=[{"role": "user", "content": "Capital of France?"}], enable_thinking=True),
    "thinking_history": dict(messages=THINKING_HISTORY),
    "thinking_history_ends_with_assistant": dict(
        messages=THINKING_HISTORY[:-1]
        + [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "<think>\nfinal\n</think>\n\nDone."}],
        add_generation_prompt=False,
    ),
    "tools": dict(messages=TOOL_CONVERSATION, tools=[WEATHER_TOOL, SEARCH_TOOL]),
    "tools_no_system": dict(messages=TOOL_CONVERSATION[1:4], tools=[SEARCH_TOOL], enable_thinking=False),
    "no_generation_prompt": dict(messages=TOOL_CONVERSATION[:6], tools=[WEATHER_TOOL], add_generation_prompt=False),
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A transformers tokenizer with a throwaway vocabulary: only its chat template path matters."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.chat_template = qwen3_template()
    return tokenizer


@pytest.fixture(scope="module")
def template():
    return ChatTemplate(qwen3_template())


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_qwen3_template_matches_transformers(case, template, hf_tokenizer):
    kwargs = dict(CASES[case])
    messages = kwargs.pop("messages")
    kwargs.setdefault("add_generation_prompt", True)
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    assert template.render(messages, **kwargs) == expected


def test_tool_rendering_details(template):
    text = template.render(TOOL_CONVERSATION, tools=[WEATHER_TOOL, SEARCH_TOOL])
    assert '"description": "城市名, e.g. 北京"' in text  # tojson keeps non-ASCII
    assert "<b>&</b>" in text  # and does not HTML-escape
    assert '"properties": {"query"' in text  # nor sort keys
    assert '"arguments": {"city": "北京", "days": [{"date": "today", "hours": [9, 12]}]}' in text
    assert '"arguments": {"city": "\\u4e0a\\u6d77"}' in text  # string arguments pass through as given
    assert text.count("<|im_start|>user\n<tool_response>") == 2  # consecutive results share one turn
    assert "Two cities" not in text  # thinking before the last user query is dropped


def test_reasoning_content_kept_after_last_query(template):
    messages = THINKING_HISTORY[:-1]
    text = template.render(messages, add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\n<think>\nadd again\n</think>\n\n4.<|im_end|>\n")
    assert "simple sum" not in text


def test_messages_are_not_mutated_and_reasoning_aliased(template, hf_tokenizer):
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny.", "reasoning": "tool said sunny"},
    ]
    snapshot = json.dumps(messages)
    text = template.render(messages, tools=[WEATHER_TOOL], add_generation_prompt=False)
    assert json.dumps(messages) == snapshot
    assert "tool said sunny" in text  # "reasoning" is aliased to reasoning_content
    assert text == hf_tokenizer.apply_chat_template(messages, tools=[WEATHER_TOOL], tokenize=False)


def test_none_valued_keys_are_dropped_as_transformers_does():
    # OpenAI clients send "content": null beside tool calls; transformers removes such keys.
    template = ChatTemplate(
        "{% for m in messages %}{{ m.content is defined }},{{ m.tool_calls is defined }};{% endfor %}"
    )
    messages = [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]
    assert template.render(messages) == "False,True;"


def test_empty_tools_render_as_none(template):
    messages = [{"role": "user", "content": "hi"}]
    assert template.render(messages, tools=[]) == template.render(messages)


def test_extra_kwargs_reach_the_template():
    template = ChatTemplate("{{ greeting }}, {{ name | default('nobody') }}")
    assert template.render([], greeting="hello") == "hello, nobody"


def test_raise_exception_becomes_qwenkit_error():
    template = ChatTemplate(
        "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok"
    )
    assert template.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(QwenkitError, match="first message must be from the user"):
        template.render([{"role": "system", "content": "x"}])


def test_template_errors_are_one_line_qwenkit_errors():
    with pytest.raises(QwenkitError, match="does not compile") as excinfo:
        ChatTemplate("{% for m in messages %}\n{{ m.content }\n")
    assert "\n" not in str(excinfo.value)
    with pytest.raises(QwenkitError, match="chat template failed"):
        ChatTemplate("{{ messages[0].content + 1 }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(QwenkitError, match="chat messages must be dicts"):
        ChatTemplate("").render(["hello"])


def test_sandbox_blocks_namespace_dunders():
    with pytest.raises(QwenkitError):
        ChatTemplate("{% set ns = namespace(_secret=1) %}").render([])


def test_loop_controls_and_generation_tag():
    template = ChatTemplate(
        "{% for m in messages %}{% if m.role == 'stop' %}{% break %}{% endif %}"
        "{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
    )
    roles = ["a", "skip", "b", "stop", "c"]
    messages = [{"role": role, "content": str(i)} for i, role in enumerate(roles, start=1)]
    assert template.render(messages) == "[1][3]"


def test_tojson_options_match_json_dumps():
    template = ChatTemplate(
        "{{ tools[0] | tojson(indent=2, sort_keys=true) }}|{{ tools[0] | tojson(separators=(',', ':')) }}"
    )
    tool = {"b": "é", "a": [1, {"z": None}]}
    expected = "|".join(
        [
            json.dumps(tool, ensure_ascii=False, indent=2, sort_keys=True),
            json.dumps(tool, ensure_ascii=False, separators=(",", ":")),
        ]
    )
    assert template.render([], tools=[tool]) == expected


def test_strftime_now():
    assert len(ChatTemplate("{{ strftime_now('%Y-%m-%d') }}").render([])) == 10


def test_whitespace_control_matches_transformers(hf_tokenizer):
    # trim_blocks / lstrip_blocks only show on templates that do not strip with "{%-".
    source = (
        "{% for m in messages %}\n"
        "    {% if m.role == 'user' %}\n"
        "  USER: {{ m.content }}\n"
        "    {% else %}\n"
        "\tOTHER: {{ m.content | tojson }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "<ok> \"quoted\""}]
    expected = hf_tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate(source).render(messages) == expected
