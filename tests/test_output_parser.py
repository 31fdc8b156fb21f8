"""Qwen output split into reasoning, content and tool calls, token by token, on ids."""

import random
import sys

import pytest

from qwenkit.chat.types import ChatDelta, ToolCall, ToolCallDelta, Usage
from qwenkit.chat.markers import SpecialIds
from qwenkit.chat.output_parser import OutputParser, parse_tool_call
from qwenkit.chat.thinking import Phase, ThinkingState, initial_phase

THINK, END_THINK, CALL, END_CALL, TURN = 100, 101, 102, 103, 104
TEXT, SPACE = 1, 2  # any ordinary token id; any whitespace-only one
IDS = SpecialIds(think_start=THINK, think_end=END_THINK, tool_call_start=CALL, tool_call_end=END_CALL,
                 turn_start=TURN, whitespace=frozenset({SPACE}))
MARKERS = {THINK: "<think>", END_THINK: "</think>", CALL: "<tool_call>", END_CALL: "</tool_call>"}


def T(text):
    return (SPACE if text.isspace() else TEXT, text)


def parser_for(ids=IDS, *, starts=False, tools=False, names=frozenset()):
    """A parser on a fresh thinking state: ``starts``, the prompt opened thinking."""
    state = ThinkingState.for_prompt([TURN, THINK] if starts else [TURN], ids)
    return OutputParser(state, parse_tool_calls=tools, tool_names=frozenset(names))


def M(token_id):
    return (token_id, MARKERS[token_id])


WEATHER = '\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
WEATHER_ARGS = '{"city": "Paris", "unit": "c"}'


def run(steps, *, starts=False, tools=True, finish="stop", ids=IDS, names=frozenset()):
    """Feed all steps; return (streamed, parts) where streamed is the concatenated deltas.
    ``names``: the offered functions, for calls written as text."""
    parser = parser_for(ids, starts=starts, tools=tools, names=names)
    deltas = [parser.feed(token_id, text) for token_id, text in steps]
    last, parts = parser.finish(finish)
    deltas.append(last)
    return collect(deltas), parts


def collect(deltas):
    reasoning = "".join(d.reasoning_content for d in deltas)
    content = "".join(d.content for d in deltas)
    calls = {}
    for d in deltas:
        for tc in d.tool_calls:
            if tc.index not in calls:
                assert tc.id is not None and tc.name is not None, "first piece of a call carries id and name"
                calls[tc.index] = [tc.id, tc.name, ""]
            else:
                assert tc.id is None and tc.name is None
            calls[tc.index][2] += tc.arguments
    assert sorted(calls) == list(range(len(calls)))
    return reasoning, content, [ToolCall(*calls[i]) for i in sorted(calls)]


def assert_consistent(streamed, parts):
    reasoning, content, calls = streamed
    assert reasoning == (parts.reasoning_content or "")
    assert content == (parts.content or "")
    assert calls == parts.tool_calls


def summary(parts):
    calls = [(c.name, c.arguments) for c in parts.tool_calls]
    return (parts.reasoning_content, parts.content, calls, parts.finish_reason)


# ---- thinking -----------------------------------------------------------------------


def test_thinking_then_answer_drops_framing_newlines():
    steps = [M(THINK), T("\n"), T("Let me"), T(" see.\n"), T("\n"), M(END_THINK),
             T("\n\n"), T("Answer"), T(".\n\nDone")]
    streamed, parts = run(steps)
    assert summary(parts) == ("Let me see.", "Answer.\n\nDone", [], "stop")
    assert_consistent(streamed, parts)


def test_reasoning_tokens_count_markers_and_everything_between():
    steps = [M(THINK), T("\n"), T("a"), T("\n"), M(END_THINK), T("\n\n"), T("b")]
    _, parts = run(steps)
    assert parts.reasoning_tokens == 5  # <think>, "\n", "a", "\n", </think>


def test_reasoning_tokens_when_prompt_opened_thinking():
    _, parts = run([T("a"), T("b"), M(END_THINK), T("c")], starts=True)
    assert (parts.reasoning_content, parts.content, parts.reasoning_tokens) == ("ab", "c", 3)


def test_no_thinking_counts_no_reasoning_tokens():
    _, parts = run([T("Hello"), T(" there")])
    assert summary(parts) == (None, "Hello there", [], "stop")
    assert parts.reasoning_tokens == 0


def test_newlines_inside_reasoning_are_kept():
    _, parts = run([M(THINK), T("a\n"), T("\nb"), M(END_THINK)])
    assert parts.reasoning_content == "a\n\nb"


def test_never_closed_thinking_is_all_reasoning_and_no_content():
    steps = [M(THINK), T("\n"), T("still "), T("thinking\n")]
    streamed, parts = run(steps, finish="length")
    assert summary(parts) == ("still thinking", None, [], "length")
    assert parts.reasoning_tokens == 4
    assert_consistent(streamed, parts)


def test_thinking_off_prefilled_prompt_is_all_content():
    # enable_thinking=False: the prompt ends in "<think>\n\n</think>\n\n"; a <think> after it is text
    prompt = [TURN, 5, TURN, 6, THINK, 7, END_THINK, 7]
    assert initial_phase(prompt, IDS) is Phase.ANSWER
    parser = OutputParser(ThinkingState.for_prompt(prompt, IDS), parse_tool_calls=False)
    for token_id, text in [T("Hi"), M(THINK), T("!")]:
        parser.feed(token_id, text)
    assert summary(parser.finish("stop")[1]) == (None, "Hi<think>!", [], "stop")


def test_initial_phase_reads_the_generation_turn():
    assert initial_phase([TURN, 5, THINK, 7], IDS) is Phase.THINKING  # QwQ's prompt
    assert initial_phase([THINK], IDS) is Phase.THINKING
    assert initial_phase([TURN, 5, TURN, 6], IDS) is Phase.BEFORE_THINKING  # Qwen3, thinking on
    assert initial_phase([TURN, THINK, 5, END_THINK, 6, TURN, 7], IDS) is Phase.BEFORE_THINKING  # history
    assert initial_phase([TURN, 6, THINK, END_THINK], IDS) is Phase.ANSWER  # thinking off
    assert initial_phase([THINK, 5, END_THINK, 6], SpecialIds(think_start=THINK, think_end=END_THINK)) \
        is Phase.ANSWER  # no turn marker: the whole prompt is the turn
    assert initial_phase([5, THINK], SpecialIds()) is Phase.ANSWER  # no think tokens


def test_prompt_that_opens_thinking():
    _, parts = run([T("\nhmm\n"), M(END_THINK), T("\n\nok")], starts=True)
    assert summary(parts) == ("hmm", "ok", [], "stop")


def test_think_later_in_the_answer_is_content():
    _, parts = run([T("Use "), M(THINK), T(" tags"), M(END_THINK)])
    assert summary(parts) == (None, "Use <think> tags</think>", [], "stop")


def test_whitespace_before_think_is_dropped_and_thinking_opens():
    _, parts = run([T("\n"), T(" "), M(THINK), T("r"), M(END_THINK), T("a")])
    assert summary(parts) == ("r", "a", [], "stop")


def test_thinking_opens_only_once():
    _, parts = run([M(THINK), T("r"), M(END_THINK), M(THINK), T("x")])
    assert summary(parts) == ("r", "<think>x", [], "stop")


def test_think_inside_thinking_is_reasoning_text():
    _, parts = run([M(THINK), T("a "), M(THINK), T(" b"), M(END_THINK), T("c")])
    assert summary(parts) == ("a <think> b", "c", [], "stop")


def test_empty_thinking_gives_none_reasoning():
    _, parts = run([M(THINK), T("\n\n"), M(END_THINK), T("\n\n"), T("ok")])
    assert summary(parts) == (None, "ok", [], "stop")


def test_marker_text_never_leaks_but_held_back_text_is_kept():
    # The detokenizer held back "é" from the token before the marker; it arrives with it.
    _, parts = run([M(THINK), T("caf"), (TEXT, ""), (END_THINK, "é</think>"), T("ok")])
    assert summary(parts) == ("café", "ok", [], "stop")
    # A tokenizer that skips special tokens gives "" for the marker.
    _, parts = run([(THINK, ""), T("r"), (END_THINK, ""), T("a")])
    assert summary(parts) == ("r", "a", [], "stop")


def test_model_without_think_tokens():
    ids = SpecialIds(tool_call_start=CALL, tool_call_end=END_CALL)
    _, parts = run([(THINK, "<think>"), T("x"), (END_THINK, "</think>")], ids=ids)
    assert summary(parts) == (None, "<think>x</think>", [], "stop")
    _, parts = run([T("x")], ids=ids, starts=True)  # no think tokens: the prompt cannot open thinking
    assert summary(parts) == (None, "x", [], "stop")


def test_trailing_newlines_held_while_streaming():
    parser = parser_for()
    assert parser.feed(TEXT, "a\n").content == "a"
    assert parser.feed(TEXT, "\n").content == ""
    assert parser.feed(TEXT, "b").content == "\n\nb"
    assert parser.feed(TEXT, " \n").content == ""
    last, parts = parser.finish("stop")
    assert last.content == " \n"  # plain trailing whitespace is the model's, kept
    assert parts.content == "a\n\nb \n"


def test_leading_reasoning_newlines_not_streamed():
    parser = parser_for()
    assert not parser.feed(THINK, "<think>")
    assert not parser.feed(TEXT, "\n")
    assert parser.feed(TEXT, "x\n").reasoning_content == "x"
    assert not parser.feed(END_THINK, "</think>")
    assert not parser.feed(TEXT, "\n\n")
    assert parser.feed(TEXT, "y").content == "y"


def test_feed_after_finish_is_an_error():
    parser = parser_for()
    parser.finish("stop")
    with pytest.raises(RuntimeError):
        parser.feed(TEXT, "x")
    with pytest.raises(RuntimeError):
        parser.finish("stop")


# ---- tool calls ---------------------------------------------------------------------


def test_one_tool_call_after_thinking():
    steps = [M(THINK), T("\nneed weather\n"), M(END_THINK), T("\n\n"), T("Checking."), T("\n"),
             M(CALL), T(WEATHER), M(END_CALL)]
    streamed, parts = run(steps)
    assert summary(parts) == ("need weather", "Checking.", [("get_weather", WEATHER_ARGS)], "tool_calls")
    assert parts.tool_calls[0].id.startswith("call_") and len(parts.tool_calls[0].id) == 29
    assert_consistent(streamed, parts)


def test_only_tool_calls_gives_none_content():
    _, parts = run([M(THINK), T("x"), M(END_THINK), T("\n\n"), M(CALL), T(WEATHER), M(END_CALL)])
    assert summary(parts) == ("x", None, [("get_weather", WEATHER_ARGS)], "tool_calls")


def test_two_tool_calls_streamed_with_indices():
    second = '\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n'
    parser = parser_for(tools=True)
    deltas = [parser.feed(CALL, "<tool_call>")]
    deltas += [parser.feed(TEXT, piece) for piece in (WEATHER[:10], WEATHER[10:])]
    closing = parser.feed(END_CALL, "</tool_call>")
    assert closing.tool_calls == [ToolCallDelta(0, parser.tool_calls[0].id, "get_weather", WEATHER_ARGS)]
    assert not parser.feed(TEXT, "\n")
    deltas.append(closing)
    deltas += [parser.feed(CALL, "<tool_call>"), parser.feed(TEXT, second)]
    closing = parser.feed(END_CALL, "</tool_call>")
    assert [(d.index, d.name) for d in closing.tool_calls] == [(1, "get_time")]
    deltas.append(closing)
    deltas.append(parser.feed(TEXT, "\n"))
    last, parts = parser.finish("stop")
    deltas.append(last)
    assert summary(parts) == (None, None, [("get_weather", WEATHER_ARGS), ("get_time", '{"tz": "Europe/Paris"}')],
                              "tool_calls")
    assert len({c.id for c in parts.tool_calls}) == 2
    assert_consistent(collect(deltas), parts)


def test_tool_call_inside_thinking_is_reasoning():
    steps = [M(THINK), T("maybe "), M(CALL), T(WEATHER), M(END_CALL), M(END_THINK), T("Sunny.")]
    streamed, parts = run(steps)
    assert summary(parts) == ("maybe <tool_call>" + WEATHER + "</tool_call>", "Sunny.", [], "stop")
    assert_consistent(streamed, parts)


def test_malformed_tool_call_is_content():
    bad = '\n{"name": "get_weather", "arguments": {"city": "Par\n'
    streamed, parts = run([T("Sure."), T("\n"), M(CALL), T(bad), M(END_CALL)])
    assert summary(parts) == (None, "Sure.\n<tool_call>" + bad + "</tool_call>", [], "stop")
    assert_consistent(streamed, parts)


def test_unclosed_tool_call_is_content():
    streamed, parts = run([M(CALL), T('\n{"name": "f", "argu')], finish="length")
    assert summary(parts) == (None, '<tool_call>\n{"name": "f", "argu', [], "length")
    assert_consistent(streamed, parts)


def test_bad_call_then_good_call():
    steps = [M(CALL), T("not json"), M(END_CALL), T("\n"), M(CALL), T(WEATHER), M(END_CALL)]
    streamed, parts = run(steps)
    assert summary(parts) == (None, "<tool_call>not json</tool_call>", [("get_weather", WEATHER_ARGS)], "tool_calls")
    assert_consistent(streamed, parts)


def test_text_after_tool_call_is_kept_and_whitespace_between_calls_dropped():
    steps = [T("A"), T("\n"), M(CALL), T(WEATHER), M(END_CALL), T("\n"), T("B"), T("\n")]
    streamed, parts = run(steps)
    assert summary(parts) == (None, "A\nB\n", [("get_weather", WEATHER_ARGS)], "tool_calls")
    assert_consistent(streamed, parts)


def test_tool_markers_are_text_without_tools():
    streamed, parts = run([M(CALL), T(WEATHER), M(END_CALL)], tools=False)
    assert summary(parts) == (None, "<tool_call>" + WEATHER + "</tool_call>", [], "stop")
    assert_consistent(streamed, parts)


def test_stray_end_marker_is_content():
    _, parts = run([T("x"), M(END_CALL)])
    assert parts.content == "x</tool_call>"


def test_length_with_tool_calls_stays_length():
    _, parts = run([M(CALL), T(WEATHER), M(END_CALL), T("more")], finish="length")
    assert parts.finish_reason == "length"


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"name": "f", "arguments": {"a": 1}}', ("f", '{"a": 1}')),
        ('{"name":"f","arguments":{"a":[1,2],"b":"é"}}', ("f", '{"a": [1, 2], "b": "é"}')),
        ('{"name": "f"}', ("f", "{}")),
        ('{"name": "f", "arguments": "{\\"a\\": 1}"}', ("f", '{"a": 1}')),
        ('{"name": "f", "arguments": [1]}', None),
        ('{"name": "f", "arguments": "nope"}', None),
        ('{"name": "f", "parameters": {"a": 1}}', ("f", '{"a": 1}')),
        ('{"arguments": {}}', None),
        ('{"name": 3, "arguments": {}}', None),
        ("[1, 2]", None),
        ('{"name": "f", "arguments": {}} trailing', None),
        ("", None),
    ],
)
def test_parse_tool_call(text, expected):
    assert parse_tool_call(text) == expected


# ---- tool calls written as text (no markers) ------------------------------------------

NAMES = frozenset({"get_weather", "t"})
BARE = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
PRETTY = '{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris",\n    "unit": "c"\n  }\n}'


@pytest.mark.parametrize("text", [
    BARE, PRETTY, "```json\n" + PRETTY + "\n```", "```\n" + BARE + "\n```\n", "  " + BARE + "\n",
    "```JSON\n" + BARE + "\n```",
    '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}',
])
def test_call_written_as_json_text_is_a_tool_call(text):
    """What the default model writes instead of <tool_call> blocks (bare, fenced, pretty)."""
    streamed, parts = run([T(text)], names=NAMES)
    assert summary(parts) == (None, None, [("get_weather", WEATHER_ARGS)], "tool_calls")
    assert_consistent(streamed, parts)


@pytest.mark.parametrize("text", [
    '{"name": "get_time", "arguments": {}}',  # not an offered function
    '{"name": "get_weather", "arguments": "{}"}',  # arguments not an object
    '{"name": "get_weather"}',  # no arguments
    '{"name": "get_weather", "arguments": {}, "id": 1}',  # another key
    'Call it like this: {"name": "get_weather", "arguments": {}}',  # not at a line start
    '```python\n{"name": "get_weather", "arguments": {}}\n```',  # a fence of code
    '```json\n{"name": "get_weather", "arguments": {}}\nmore\n```',  # more than the object
    '{"name": "get_weather", "arguments": {}',  # never closed
    "{\n  int x = 1;\n}",  # code
    '[{"name": "get_weather", "arguments": {}}]',
])
def test_other_json_text_is_content(text):
    streamed, parts = run([T(text)], names=NAMES)
    assert summary(parts) == (None, text.strip(), [], "stop")
    assert_consistent(streamed, parts)


def test_text_calls_need_offered_tools_and_come_after_thinking():
    _, parts = run([T(BARE)], names=frozenset())
    assert summary(parts) == (None, BARE, [], "stop")
    _, parts = run([T(BARE)], tools=False, names=NAMES)
    assert summary(parts) == (None, BARE, [], "stop")
    _, parts = run([M(THINK), T(BARE), M(END_THINK), T("ok")], names=NAMES)
    assert summary(parts) == (BARE, "ok", [], "stop")


def test_text_around_json_calls():
    text = "Let me check.\n" + BARE + "\n```json\n" + '{"name": "t", "arguments": {"q": 1}}' + "\n```\n\nDone."
    streamed, parts = run([T(text)], names=NAMES)
    assert summary(parts) == (None, "Let me check.\nDone.", [("get_weather", WEATHER_ARGS), ("t", '{"q": 1}')],
                              "tool_calls")
    assert_consistent(streamed, parts)


def test_a_candidate_call_is_held_back_then_released_or_called():
    parser = parser_for(tools=True, names=NAMES)
    deltas = [parser.feed(TEXT, char) for char in BARE]
    assert not any(d.content for d in deltas)  # nothing of the call leaks as content
    assert [d.tool_calls[0].name for d in deltas if d.tool_calls] == ["get_weather"]
    assert deltas[-1].tool_calls  # streamed the moment the object closed
    parser = parser_for(tools=True, names=NAMES)
    assert parser.feed(TEXT, "{").content == ""
    assert parser.feed(TEXT, "\n  int").content == "{\n  int"  # released once it cannot be JSON
    parser = parser_for(tools=True, names=NAMES)
    assert parser.feed(TEXT, "```").content == ""
    assert parser.feed(TEXT, "python\n").content == "```python"  # another fence: text at once
    assert parser.feed(TEXT, '{"a": 1}').content == '\n{"a": 1}'  # JSON inside it is text too


def test_json_that_is_no_call_is_released_at_its_first_key():
    """An ordinary JSON answer streams at once, not when its object closes."""
    parser = parser_for(tools=True, names=NAMES)
    assert parser.feed(TEXT, '{\n  "answ').content == ""
    assert parser.feed(TEXT, 'er": ').content == '{\n  "answer":'  # (the trailing space is held)
    parser = parser_for(tools=True, names=NAMES)
    assert parser.feed(TEXT, '```json\n{"city": ').content == '```json\n{"city":'
    assert parser.feed(TEXT, '"Paris"}\n```\n{"x"').content == ' "Paris"}\n```\n{"x"'


def test_text_call_then_marker_call():
    streamed, parts = run([T(BARE + "\n"), M(CALL), T(WEATHER), M(END_CALL)], names=NAMES)
    assert [c.name for c in parts.tool_calls] == ["get_weather", "get_weather"]
    assert parts.content is None
    assert_consistent(streamed, parts)


TEXT_CASES = [
    ([T("Sure.\n"), T(PRETTY), T("\n")], (None, "Sure.", [("get_weather", WEATHER_ARGS)], "tool_calls")),
    ([T("```json\n" + BARE + "\n```")], (None, None, [("get_weather", WEATHER_ARGS)], "tool_calls")),
    ([T("<tools>\n" + '{"type": "function", "function": {"name": "get_weather"}}' + "\n</tools>\n\n"), T(BARE)],
     (None, '<tools>\n{"type": "function", "function": {"name": "get_weather"}}\n</tools>',
      [("get_weather", WEATHER_ARGS)], "tool_calls")),
    ([T('```python\nx = {"a": "}"}\n```\n' + BARE)], (None, '```python\nx = {"a": "}"}\n```',
                                                      [("get_weather", WEATHER_ARGS)], "tool_calls")),
    ([T('{"name": "t", "arguments": {"s": "a \\" } {"}}')], (None, None, [("t", '{"s": "a \\" } {"}')], "tool_calls")),
    ([T("{\n  int x;\n}\n")], (None, "{\n  int x;\n}\n", [], "stop")),
    ([T('```json\n{"name": "t", "arguments": {}}\n\n  ```  \nok')], (None, "ok", [("t", "{}")], "tool_calls")),
    ([T('```json\n{"name": "t", "arguments": {}}\n```more\n```\n' + BARE)],
     (None, '```json\n{"name": "t", "arguments": {}}\n```more\n```', [("get_weather", WEATHER_ARGS)], "tool_calls")),
    ([T('```\n{"name": "t", "arguments": {}}'), T("\n``")], (None, None, [("t", "{}")], "tool_calls")),
    ([T('{"name": "t", "arguments": {"s": "}"}}x\n{"b": 1}')],
     (None, 'x\n{"b": 1}', [("t", '{"s": "}"}')], "tool_calls")),
]


@pytest.mark.parametrize("case", range(len(TEXT_CASES)))
def test_text_calls_under_random_splits(case):
    steps, expected = TEXT_CASES[case]
    rng = random.Random(case)
    for trial in range(200):
        tokens = steps if trial == 0 else random_split(steps, rng)
        streamed, parts = run(tokens, names=NAMES)
        assert summary(parts) == expected, tokens
        assert_consistent(streamed, parts)


# ---- streaming == final, under any token split ---------------------------------------

CASES = [
    # (steps as logical pieces, the prompt opened thinking, parse_tool_calls, finish, expected summary)
    ([M(THINK), T("\nI think.\n\nMore.\n"), M(END_THINK), T("\n\nThe answer\n\nis 4.")], False, True, "stop",
     ("I think.\n\nMore.", "The answer\n\nis 4.", [], "stop")),
    ([T("\nhmm 思考\n"), M(END_THINK), T("\n\n你好，世界 🌍")], True, False, "stop",
     ("hmm 思考", "你好，世界 🌍", [], "stop")),
    ([M(THINK), T("\nlong thought "), M(CALL), T("x"), T("\n\n")], False, True, "length",
     ("long thought <tool_call>x", None, [], "length")),
    ([M(THINK), T("\nplan\n"), M(END_THINK), T("\n\nLet me look.\n"), M(CALL), T(WEATHER), M(END_CALL), T("\n"),
      M(CALL), T('\n{"name": "t", "arguments": {"q": "a b\\n"}}\n'), M(END_CALL)], False, True, "stop",
     ("plan", "Let me look.", [("get_weather", WEATHER_ARGS), ("t", '{"q": "a b\\n"}')], "tool_calls")),
    ([T("  code:\n    x = 1\n"), M(CALL), T("{bad"), M(END_CALL), T("\n\n")], False, True, "stop",
     (None, "  code:\n    x = 1\n<tool_call>{bad</tool_call>\n\n", [], "stop")),
    ([T("\n\n"), M(THINK), T("r"), M(END_THINK), T("\n"), M(THINK), T("\n")], False, True, "stop",
     ("r", "<think>\n", [], "stop")),
    ([M(CALL), T(WEATHER), M(END_CALL), T("\n\nDone "), M(CALL), T('{"name": "f"'), M(END_CALL)], False, True,
     "stop", (None, 'Done <tool_call>{"name": "f"</tool_call>', [("get_weather", WEATHER_ARGS)], "tool_calls")),
    ([M(CALL), T(WEATHER), M(END_CALL), T(" \n ")], False, False, "stop",
     (None, "<tool_call>" + WEATHER + "</tool_call> \n ", [], "stop")),
    ([T("a\n\n\n")], False, True, "stop", (None, "a\n\n\n", [], "stop")),
    ([T("\n\n")], False, True, "stop", (None, None, [], "stop")),
    ([], False, True, "length", (None, None, [], "length")),
]


def random_split(steps, rng):
    """Re-tokenize: cut text pieces at random, and sometimes let the detokenizer hold a
    piece back ("") so that its text arrives with the next token, markers included."""
    tokens = []
    for token_id, text in steps:
        if token_id not in (TEXT, SPACE):
            tokens.append((token_id, text))
            continue
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 4)))) if len(text) > 1 else []
        bounds = [0, *cuts, len(text)]
        tokens += [T(text[a:b]) for a, b in zip(bounds, bounds[1:])]
    out, held = [], ""
    for i, (token_id, text) in enumerate(tokens):
        text = held + text
        if token_id in (TEXT, SPACE) and i + 1 < len(tokens) and rng.random() < 0.3:
            out.append((token_id, ""))
            held = text
        else:
            out.append((token_id, text))
            held = ""
    assert "".join(t for _, t in out) == "".join(t for _, t in steps)
    return out


@pytest.mark.parametrize("case", range(len(CASES)))
def test_streaming_equals_final_under_random_splits(case):
    steps, starts, tools, finish, expected = CASES[case]
    rng = random.Random(case)
    for trial in range(200):
        tokens = steps if trial == 0 else random_split(steps, rng)
        streamed, parts = run(tokens, starts=starts, tools=tools, finish=finish)
        assert summary(parts) == expected, tokens
        assert_consistent(streamed, parts)


def test_random_outputs_streaming_equals_final():
    """Random token soup: whatever the parser decides, the stream adds up to the result."""
    rng = random.Random(1234)
    vocab = ["a", " b", "\n", "\n\n", " ", "{", '"name": "f"', '"arguments": {}', "}", ",", "é", "", "```", "json"]
    for _ in range(2000):
        steps = []
        for _ in range(rng.randint(0, 25)):
            if rng.random() < 0.25:
                steps.append(M(rng.choice(list(MARKERS))))
            else:
                steps.append(T(rng.choice(vocab)))
        streamed, parts = run(steps, starts=rng.random() < 0.3, tools=rng.random() < 0.7,
                              finish=rng.choice(["stop", "length"]), names={"f"} if rng.random() < 0.5 else ())
        assert_consistent(streamed, parts)
        if parts.content is not None:
            assert parts.content == parts.content.lstrip("\n")
        if parts.reasoning_content is not None:
            assert parts.reasoning_content == parts.reasoning_content.strip("\n")


# ---- with a real byte-level BPE tokenizer and the incremental detokenizer ------------


def test_with_real_tokenizer_and_detokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

    from qwenkit.tokenizer import IncrementalDetokenizer, Tokenizer

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(["The weather in Paris is sunny.", '{"name": "get_weather"}'], trainer)
    markers = ["<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]
    backend.add_tokens([AddedToken(t, special=t == "<|im_end|>", normalized=False) for t in markers])
    tok = Tokenizer(backend)
    ids = SpecialIds.from_tokenizer(tok)
    assert ids.has_thinking and ids.has_tool_calls

    output = ("<think>\nLe temps à Paris? 天气 🌤️\n</think>\n\nJe vérifie.\n<tool_call>\n"
              '{"name": "get_weather", "arguments": {"city": "Paris", "note": "été ☀"}}\n</tool_call>')
    token_ids = tok.encode(output)
    parser = OutputParser(ThinkingState.for_prompt([], ids), parse_tool_calls=True)
    detok = IncrementalDetokenizer(tok)
    deltas = [parser.feed(t, detok.add(t)) for t in token_ids]
    assert detok.flush() == ""
    last, parts = parser.finish("stop")
    deltas.append(last)
    assert summary(parts) == ("Le temps à Paris? 天气 🌤️", "Je vérifie.",
                              [("get_weather", '{"city": "Paris", "note": "été ☀"}')], "tool_calls")
    assert_consistent(collect(deltas), parts)
    assert parts.reasoning_tokens == token_ids.index(ids.think_end) + 1


# ---- chat types ---------------------------------------------------------------------


def test_chat_types_openai_shapes():
    call = ToolCall(id="call_1", name="f", arguments="{}")
    assert call.to_openai() == {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert ToolCallDelta(0, "call_1", "f", "").to_openai() == {
        "index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    assert ToolCallDelta(0, None, None, '{"a"').to_openai() == {"index": 0, "function": {"arguments": '{"a"'}}
    usage = Usage(prompt_tokens=10, completion_tokens=5, reasoning_tokens=3, cached_tokens=4)
    assert usage.total_tokens == 15
    assert usage.to_openai()["completion_tokens_details"] == {"reasoning_tokens": 3}
    delta = ChatDelta(content="a")
    delta.extend(ChatDelta(reasoning_content="r", content="b"))
    assert (delta.reasoning_content, delta.content, bool(delta), bool(ChatDelta())) == ("r", "ab", True, False)


def test_parts_to_completion():
    _, parts = run([M(THINK), T("r"), M(END_THINK), T("a")])
    completion = parts.to_completion(prompt_tokens=7, completion_tokens=4, request_id="req-1")
    assert (completion.content, completion.reasoning_content, completion.finish_reason) == ("a", "r", "stop")
    assert completion.usage.reasoning_tokens == 3 and completion.usage.total_tokens == 11


def test_no_torch_imported():
    import subprocess

    code = ("import sys, qwenkit.chat.output_parser, qwenkit.chat.thinking, qwenkit.chat.types;"
            " print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
