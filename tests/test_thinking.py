"""The token-id based split of Qwen3 output into reasoning and content."""

from qwenkit.thinking import ThinkingSplitter

START, END = 100, 101


def feed_all(splitter, steps):
    reasoning, content = [], []
    for token, text in steps:
        r, c = splitter.feed(token, text)
        reasoning.append(r)
        content.append(c)
    return "".join(reasoning), "".join(content)


def test_thinking_then_answer_drops_framing_newlines():
    s = ThinkingSplitter(START, END)
    steps = [(START, "<think>"), (1, "\n"), (2, "Let me"), (3, " see.\n"), (4, "\n"), (END, "</think>"),
             (5, "\n\n"), (6, "Answer"), (7, ".\n\nDone")]
    streamed = feed_all(s, steps)
    assert (s.reasoning, s.content) == ("Let me see.", "Answer.\n\nDone")
    assert streamed == (s.reasoning, s.content)


def test_newlines_inside_reasoning_are_kept():
    s = ThinkingSplitter(START, END)
    feed_all(s, [(START, ""), (1, "a\n"), (2, "\nb"), (END, "")])
    assert s.reasoning == "a\n\nb"


def test_no_thinking_is_all_content():
    s = ThinkingSplitter(START, END)
    feed_all(s, [(1, "Hello"), (2, " there")])
    assert (s.reasoning, s.content) == ("", "Hello there")


def test_think_marker_inside_the_answer_is_content():
    s = ThinkingSplitter(START, END)
    feed_all(s, [(1, "Use "), (START, "<think>"), (2, " tags")])
    assert s.reasoning == ""
    assert s.content == "Use <think> tags"


def test_prompt_that_opens_thinking():
    class Tok:
        def token_to_id(self, t):
            return {"<think>": START, "</think>": END}.get(t)

    s = ThinkingSplitter.for_prompt(Tok(), [9, START, 1])
    assert s.in_thinking
    feed_all(s, [(2, "hmm"), (END, ""), (3, "ok")])
    assert (s.reasoning, s.content) == ("hmm", "ok")
    assert not ThinkingSplitter.for_prompt(Tok(), [START, 5, END, 6]).in_thinking


def test_unclosed_thinking_leaves_content_empty():
    s = ThinkingSplitter(START, END)
    feed_all(s, [(START, ""), (1, "still thinking\n")])
    assert (s.reasoning, s.content) == ("still thinking", "")


def test_model_without_think_tokens():
    s = ThinkingSplitter(None, None)
    feed_all(s, [(1, "<think>"), (2, "x")])
    assert s.content == "<think>x"
