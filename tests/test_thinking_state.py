"""One thinking state per sequence: the thinking budget, the grammar gate, tool-call parsing
and the output parser agree on where thinking is, for every prefix the templates produce.

A fake engine drives a prepared chat's control and parser on the tiny tokenizer: the
"model" writes a scripted text, the control's forced tokens are appended where the engine
appends them, and each step's allowed-token mask is recorded. No model, no torch kernels.
"""

import pytest
from hub_cache import QWEN25_TEMPLATE, QWQ_TEMPLATE, set_chat_template
from tiny import make_tokenizer

from qwenkit.chat.prepare import prepare_chat
from qwenkit.chat.request import ChatRequest
from qwenkit.chat.structured import GrammarCompiler
from qwenkit.chat.thinking import EARLY_STOP_TEXT
from qwenkit.tokenizer import Tokenizer

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
EARLY_STOP = EARLY_STOP_TEXT.strip("\n").removesuffix("</think>").strip("\n")


def _tokenizer(folder, template=None, *, think_tokens=True) -> Tokenizer:
    make_tokenizer(folder)
    if template is not None:
        set_chat_template(folder, template)
    tokenizer = Tokenizer.from_dir(folder)
    if not think_tokens:  # Qwen2.5's vocabulary has no think tokens
        real = tokenizer.token_to_id
        tokenizer.token_to_id = lambda t: None if t in ("<think>", "</think>") else real(t)
    return tokenizer


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """The bundled Qwen3 template: hybrid thinking."""
    return _tokenizer(tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def qwq(tmp_path_factory):
    """QwQ's always-thinking template: the prompt ends in `<think>\\n`."""
    return _tokenizer(tmp_path_factory.mktemp("qwq"), QWQ_TEMPLATE)


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    """Qwen2.5: no thinking in the template, no think tokens in the vocabulary."""
    return _tokenizer(tmp_path_factory.mktemp("qwen25"), QWEN25_TEMPLATE, think_tokens=False)


def prepare(tokenizer, messages=USER, **options):
    request = ChatRequest(messages, **options)
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size) if request.needs_grammar else None
    return prepare_chat(tokenizer, request, grammar_compiler=compiler)


class Run:
    """What the fake engine saw: every appended token, the early stop's position, and per
    scripted token whether the grammar gate left it free and whether `<think>` was allowed."""

    def __init__(self, tokenizer, text, **options):
        prepared = prepare(tokenizer, **options)
        self.prompt = tokenizer.decode(prepared.prompt_token_ids)
        control, parser = prepared.controls[0], prepared.parsers[0]
        think = tokenizer.token_to_id("<think>")
        self.tokens, self.free, self.think_allowed, self.refused = [], [], [], []
        self.forced_at = None  # index in self.tokens of the first forced token
        for token in tokenizer.encode(text):
            mask = control.allowed_mask()
            self.free.append(mask is None)
            self.think_allowed.append(think is not None and (mask is None or bool(mask[think])))
            if mask is not None and not mask[token]:
                self.refused.append(tokenizer.decode([token]))
            self.tokens.append(token)
            forced = control.on_token(token)
            if forced and self.forced_at is None:
                self.forced_at = len(self.tokens)
            self.tokens.extend(forced)
        for token in self.tokens:
            parser.feed(token, tokenizer.decode([token]))
        _, self.parts = parser.finish("stop")
        self.tokenizer = tokenizer

    def thought_before_the_stop(self) -> str:
        """The text between `<think>` (or the prompt) and the forced early stop."""
        ids = self.tokens[: self.forced_at]
        think = self.tokenizer.token_to_id("<think>")
        if think in ids:
            ids = ids[ids.index(think) + 1 :]
        return self.tokenizer.decode(ids)


THOUGHT = "\nabc def ghi jkl\n"


# -- the bundled Qwen3 template, thinking on: the model opens thinking -------------------


@pytest.mark.parametrize("before", ["", "\n", "\n\n", " "])
def test_think_after_leading_whitespace_is_budgeted(qwen3, before):
    """The budget counts from a `<think>` that follows whitespace, as the parser does."""
    run = Run(qwen3, f"{before}<think>{THOUGHT}</think>\n\nIt is sunny.", thinking_budget=3)
    assert run.forced_at is not None, "the budget never cut the thinking"
    assert len(qwen3.encode(run.thought_before_the_stop())) == 3
    assert run.parts.reasoning_content == run.thought_before_the_stop().strip("\n") + "\n\n" + EARLY_STOP
    assert run.parts.reasoning_tokens == 1 + 3 + len(qwen3.encode(EARLY_STOP_TEXT.rstrip("\n")))


@pytest.mark.parametrize("before", ["", "\n", "\n\n", " "])
def test_think_after_leading_whitespace_is_free_of_the_grammar(qwen3, before):
    """The grammar applies once thinking is over, whatever whitespace came before `<think>`
    (JSON grammars refuse leading whitespace, a grammar could allow it: the gate keeps
    `<think>` allowed until a token that is not whitespace)."""
    run = Run(qwen3, f'{before}<think>\nnot JSON, {{ yet\n</think>{{"a": 1}}', response_format={"type": "json_object"})
    n = len(qwen3.encode(before))
    assert all(run.think_allowed[: n + 1]) and not any(run.free[: n + 1])  # <think> allowed, JSON gated
    answer = len(qwen3.encode('{"a": 1}'))
    assert all(run.free[n + 1 : -answer]) and not any(run.free[-answer:])  # free inside thinking only
    assert run.refused == list(before)
    assert run.parts.reasoning_content == "not JSON, { yet"
    assert run.parts.content == '{"a": 1}'


@pytest.mark.parametrize("before", ["", "\n"])
def test_tool_calls_are_parsed_only_after_thinking(qwen3, before):
    run = Run(qwen3, f"{before}<think>\nmaybe {CALL}\n</think>\n\n{CALL}", tools=TOOLS)
    assert run.parts.reasoning_content == f"maybe {CALL}"
    assert [(c.name, c.arguments) for c in run.parts.tool_calls] == [("get_weather", '{"city": "Paris"}')]
    assert run.parts.content is None


def test_think_after_answer_text_is_answer_text(qwen3):
    run = Run(qwen3, f"Hi <think>{THOUGHT}</think> there", thinking_budget=1,
              response_format={"type": "text"})
    assert run.forced_at is None
    assert run.parts.reasoning_content is None
    assert run.parts.content == f"Hi <think>{THOUGHT}</think> there"


def test_thinking_in_an_earlier_turn_leaves_this_turn_open(qwen3):
    """A tool loop: the template keeps the earlier turn's `<think>...</think>` in the prompt;
    the model may still open thinking in the new turn."""
    messages = [*USER,
                {"role": "assistant", "content": "", "reasoning_content": "I need the weather.",
                 "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                  "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "sunny"}]
    run = Run(qwen3, f"<think>{THOUGHT}</think>\n\nSunny.", messages=messages, tools=TOOLS, thinking_budget=2)
    assert "<think>\nI need the weather.\n</think>" in run.prompt
    assert len(qwen3.encode(run.thought_before_the_stop())) == 2
    assert run.parts.reasoning_content.endswith(EARLY_STOP)


# -- thinking off: the template writes an empty `<think>\n\n</think>\n\n` ------------------


@pytest.mark.parametrize("switch", [{"enable_thinking": False}, {"thinking_budget": 0},
                                    {"messages": [{"role": "user", "content": "Hi /no_think"}]}])
def test_thinking_off_prompt_makes_think_answer_text(qwen3, switch):
    """The prompt already holds this turn's (empty) thinking: a `<think>` the model writes
    is answer text for the parser, the budget and the grammar gate alike."""
    run = Run(qwen3, f"<think>{THOUGHT}</think>\n\nIt is sunny.", **{"thinking_budget": 1, **switch})
    assert run.prompt.endswith("<think>\n\n</think>\n\n")
    assert run.forced_at is None
    assert run.parts.reasoning_content is None and run.parts.reasoning_tokens == 0
    assert run.parts.content == f"<think>{THOUGHT}</think>\n\nIt is sunny."
    gated = Run(qwen3, '<think>{"a": 1}', enable_thinking=False, response_format={"type": "json_object"})
    assert gated.think_allowed == [False] * len(gated.think_allowed)
    assert gated.refused == ["<think>"]


# -- QwQ: the prompt opens thinking ------------------------------------------------------


def test_prompt_that_opens_thinking(qwq):
    run = Run(qwq, f"abc def ghi jkl {CALL}\n</think>\n\n{CALL}", thinking_budget=3, tools=TOOLS)
    assert run.prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert len(qwq.encode(run.thought_before_the_stop())) == 3
    assert run.parts.reasoning_content == run.thought_before_the_stop() + "\n\n" + EARLY_STOP
    gated = Run(qwq, 'not JSON {\n</think>{"a": 1}', response_format={"type": "json_object"})
    assert gated.refused == []
    assert all(gated.free[: len(qwq.encode("not JSON {\n</think>"))]) and not gated.free[-1]
    assert gated.parts.reasoning_content == "not JSON {" and gated.parts.content == '{"a": 1}'


def test_prompt_that_opens_thinking_with_budget_zero(qwq):
    """Budget 0 on a prompt that opened thinking: the early stop closes it in the prompt."""
    run = Run(qwq, "It is sunny.", thinking_budget=0)
    assert run.prompt.endswith("<think>\n" + EARLY_STOP_TEXT)
    assert run.forced_at is None
    assert run.parts.reasoning_content is None and run.parts.content == "It is sunny."


# -- Qwen2.5: no thinking at all ---------------------------------------------------------


def test_model_without_think_tokens(qwen25):
    run = Run(qwen25, f"\n<think>{THOUGHT}</think>\n\nIt is sunny.", thinking_budget=1,
              response_format={"type": "json_object"})
    assert run.prompt.endswith("<|im_start|>assistant\n")
    assert run.forced_at is None and run.parts.reasoning_content is None
    assert not any(run.free)
