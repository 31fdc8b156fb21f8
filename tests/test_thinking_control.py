"""Thinking on or off (hard and soft switch) and the thinking budget, read from the
sequence's thinking state."""

import pytest

from qwenkit.chat.markers import SpecialIds
from qwenkit.chat.output_parser import OutputParser
from qwenkit.chat.thinking import (
    EARLY_STOP_TEXT,
    Phase,
    Role,
    ThinkingBudget,
    ThinkingState,
    close_thinking,
    early_stop_token_ids,
    effective_enable_thinking,
    resolve_thinking_mode,
)

THINK, END_THINK, TURN = 100, 101, 104
IDS = SpecialIds(think_start=THINK, think_end=END_THINK, turn_start=TURN, whitespace=frozenset({9}))
STOP_IDS = [50, 51, END_THINK, 52]  # stands for the tokenized EARLY_STOP_TEXT
TEXTS = {THINK: "<think>", END_THINK: "</think>", 50: "\n\nConsidering...", 51: " now.\n", 52: "\n\n"}


def budget(n, *, starts=False):
    state = ThinkingState(IDS, Phase.THINKING if starts else Phase.BEFORE_THINKING)
    return ThinkingBudget(n, state, STOP_IDS)


def feed(b, token):
    """What the sequence's control does with each token: advance the state, ask the budget."""
    b.state.advance(token)
    return b.after_token()


def generate(b, model_tokens, *, max_tokens=100):
    """A fake engine: the model would write `model_tokens` (then stop); forced tokens
    replace sampling. Returns every token appended, in order."""
    model = iter(model_tokens)
    out, forced = [], []
    while len(out) < max_tokens:
        if forced:
            token = forced.pop(0)
        else:
            token = next(model, None)
            if token is None:
                break
        out.append(token)
        forced += feed(b, token)
    return out


def test_budget_cuts_at_exactly_n_thinking_tokens():
    b = budget(3)
    assert feed(b, THINK) == []  # the opening <think> is not counted
    assert feed(b, 1) == [] and feed(b, 2) == []
    assert b.state.num_thinking_tokens == 2 and b.state.phase is Phase.THINKING
    assert feed(b, 3) == STOP_IDS
    assert b.is_triggered and b.state.num_thinking_tokens == 3
    # the forced tokens close thinking; nothing is forced again
    assert [feed(b, t) for t in STOP_IDS + [4, 5, THINK, 6]] == [[]] * 8
    assert b.state.phase is Phase.ANSWER and b.state.num_thinking_tokens == 3 + 2  # 50, 51 were thinking


def test_engine_loop_forces_ids_right_after_budget():
    out = generate(budget(4), [THINK, 1, 2, 3, 4, 5, 6, END_THINK, 7])
    assert out == [THINK, 1, 2, 3, 4, *STOP_IDS, 5, 6, END_THINK, 7]


def test_budget_not_triggered_when_thinking_ends_before():
    b = budget(5)
    out = generate(b, [THINK, 1, 2, 3, 4, END_THINK, 7, 8, 9, 10, 11])
    assert out == [THINK, 1, 2, 3, 4, END_THINK, 7, 8, 9, 10, 11]
    assert not b.is_triggered and b.state.num_thinking_tokens == 4


def test_budget_when_prompt_opened_thinking():
    b = budget(2, starts=True)
    out = generate(b, [1, 2, 3, END_THINK, 7])
    assert out == [1, 2, *STOP_IDS, 3, END_THINK, 7]


def test_budget_counts_from_a_think_after_whitespace():
    assert generate(budget(2), [9, 9, THINK, 1, 2, 3, END_THINK]) == [9, 9, THINK, 1, 2, *STOP_IDS, 3, END_THINK]
    assert generate(budget(0), [9, THINK, 1]) == [9, THINK, *STOP_IDS, 1]


def test_budget_zero():
    assert effective_enable_thinking(True, 0) is False
    # thinking off in the template: the model does not open <think>, nothing is forced
    assert generate(budget(0), [7, 8]) == [7, 8]
    # if it opens anyway (a template that ignores enable_thinking), the early stop comes at once
    assert generate(budget(0), [THINK, 1, END_THINK, 7]) == [THINK, *STOP_IDS, 1, END_THINK, 7]
    # a prompt that opened thinking (QwQ): closed in the prompt, before the first token
    assert close_thinking([TURN, 5, TURN, THINK, 6], IDS, _FakeTokenizer()) == [TURN, 5, TURN, THINK, 6, *STOP_IDS]
    assert close_thinking([TURN, 5, TURN, 6], IDS, _FakeTokenizer()) == [TURN, 5, TURN, 6]


def test_think_later_in_the_answer_does_not_start_the_budget():
    b = budget(1)
    assert generate(b, [7, THINK, 1, 2, 3]) == [7, THINK, 1, 2, 3]
    assert not b.is_triggered


def test_max_tokens_counts_forced_tokens_too():
    out = generate(budget(2), [THINK, 1, 2, 3], max_tokens=5)
    assert out == [THINK, 1, 2, *STOP_IDS[:2]]  # cut inside the forced text: finish "length"


def test_budget_needs_think_tokens():
    with pytest.raises(ValueError):
        ThinkingBudget(3, ThinkingState(IDS, Phase.BEFORE_THINKING), early_stop_token_ids=[50, 51])
    with pytest.raises(ValueError):
        ThinkingBudget(1, ThinkingState(SpecialIds(), Phase.ANSWER), early_stop_token_ids=[])
    with pytest.raises(ValueError):
        ThinkingState(SpecialIds(), Phase.BEFORE_THINKING)  # no think tokens: no thinking


def test_effective_enable_thinking():
    assert effective_enable_thinking(True, None) is True
    assert effective_enable_thinking(True, 100) is True
    assert effective_enable_thinking(False, 100) is False
    assert effective_enable_thinking(False, None) is False


def test_budget_with_output_parser():
    """The parser reads the budget's own thinking state: the forced text lands in the
    reasoning, and the answer follows it."""
    b = budget(2)
    out = generate(b, [THINK, 1, 2, 3, END_THINK, 7])
    texts = {**TEXTS, 1: "\nI ", 2: "wonder", 3: " more", 7: "Answer."}
    parser = OutputParser(b.state, parse_tool_calls=False)
    for t in out:
        parser.feed(t, texts[t])
    _, parts = parser.finish("stop")
    assert parts.reasoning_content == "I wonder\n\nConsidering... now."
    # after a forced </think>, the model's own text is the answer (here " more</think>Answer.")
    assert parts.content == " more</think>Answer."
    assert parts.reasoning_tokens == 1 + 2 + 3  # <think>, two thinking tokens, forced up to </think>


class _FakeTokenizer:
    def __init__(self, has_think=True):
        self.vocab = {"<think>": THINK, "</think>": END_THINK} if has_think else {}

    def token_to_id(self, token):
        return self.vocab.get(token)

    def encode(self, text):
        assert text == EARLY_STOP_TEXT
        return STOP_IDS


def test_early_stop_ids_from_tokenizer():
    assert early_stop_token_ids(_FakeTokenizer()) == STOP_IDS
    with pytest.raises(ValueError):
        early_stop_token_ids(_FakeTokenizer(has_think=False))


def test_early_stop_text_is_the_qwen_wording():
    assert EARLY_STOP_TEXT.startswith("\n\nConsidering the limited time by the user, I have to give the solution")
    assert EARLY_STOP_TEXT.endswith("directly now.\n</think>\n\n")


def test_early_stop_ids_with_real_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

    from qwenkit.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["Considering the limited time"], trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    backend.add_tokens([AddedToken(t, normalized=False) for t in ("<think>", "</think>")])
    tok = Tokenizer(backend)
    token_ids = early_stop_token_ids(tok)
    assert tok.decode(token_ids) == EARLY_STOP_TEXT
    assert tok.token_to_id("</think>") in token_ids


# ---- soft switch --------------------------------------------------------------------


def user(text):
    return {"role": "user", "content": text}


@pytest.mark.parametrize(
    "messages, enable, expected",
    [
        ([user("hi")], True, True),
        ([user("hi /no_think")], True, False),
        ([user("hi /think")], True, True),
        ([user("hi /think")], False, False),  # the soft switch cannot turn thinking on
        ([user("a /no_think then /think")], True, True),  # last tag in the message wins
        ([user("a /think then /no_think")], True, False),
        ([user("q1 /no_think"), {"role": "assistant", "content": "a1"}, user("q2")], True, False),
        ([user("q1 /no_think"), {"role": "assistant", "content": "a1"}, user("q2 /think")], True, True),
        ([{"role": "system", "content": "Be brief. /no_think"}, user("q")], True, False),
        ([{"role": "system", "content": "/no_think"}, user("q /think")], True, True),
        ([user("q /no_think"), {"role": "assistant", "content": "/think"}, {"role": "tool", "content": "/think"}],
         True, False),
        ([user("see http://x.org/think/a and /thinking and a/no_think")], True, True),  # not tags
        ([user("/no_think.")], True, False),
        ([{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {}},
                                       {"type": "text", "text": "/no_think"}]}], True, False),
        ([{"role": "user", "content": None}], True, True),
        ([], True, True),
    ],
)
def test_resolve_thinking_mode(messages, enable, expected):
    assert resolve_thinking_mode(messages, enable) is expected


def test_the_parser_reads_the_roles_the_engine_recorded():
    """The engine advances the state with each token it shows the control; the parser reads
    those roles back, and advances past the token that ended the sequence itself (the
    engine shows the control no such token)."""
    state = ThinkingState(IDS, Phase.BEFORE_THINKING)
    for token in (9, THINK, 1):
        state.advance(token)
    parser = OutputParser(state, parse_tool_calls=False)
    for token, text in ((9, "\n"), (THINK, "<think>"), (1, "hmm"), (END_THINK, "</think>")):
        parser.feed(token, text)
    assert state.roles == [Role.ANSWER, Role.OPEN, Role.THINKING, Role.CLOSE] and state.phase is Phase.ANSWER
    assert parser.finish("stop")[1].reasoning_content == "hmm"
    with pytest.raises(ValueError, match="read before"):
        state.role_at(6, 7)
