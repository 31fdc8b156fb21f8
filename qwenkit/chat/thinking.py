"""Qwen's thinking: whether the model thinks, where its thinking is, and how long it may be.

* :func:`resolve_thinking_mode`: the request's ``enable_thinking`` and Qwen3's soft
  switch (``/think`` and ``/no_think`` in user or system messages).
* :func:`effective_enable_thinking`: a thinking budget of 0 means no thinking at all,
  which is rendering the chat template with ``enable_thinking=False`` (it pre-fills an
  empty `<think>\\n\\n</think>\\n\\n`).
* :class:`ThinkingState`: where one generated sequence stands (before thinking, thinking,
  answer), on token ids. It is the only place that knows the `<think>` protocol: the
  thinking budget, the grammar gate (:class:`qwenkit.chat.prepare.ChatControl`) and the
  output parser with its tool-call parsing all read the same instance, so they cannot
  disagree about where thinking is.
* :class:`ThinkingBudget`: once the model has thought for ``budget`` tokens, the engine
  forces :data:`EARLY_STOP_TEXT` (the Qwen team's wording, ending in `</think>`) and the
  model goes on to answer.

No torch.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from qwenkit.chat.markers import SpecialIds

EARLY_STOP_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking directly now.\n"
    "</think>\n\n"
)

# "/think" or "/no_think" as a word: not part of a path or URL ("a/think", "/thinking").
_SOFT_SWITCH = re.compile(r"(?<![\w/])/(think|no_think)(?![\w/-])")


class _Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def token_to_id(self, token: str) -> int | None: ...


def resolve_thinking_mode(messages: Sequence[Mapping[str, Any]], enable_thinking: bool) -> bool:
    """Whether the model should think, after Qwen3's soft switch.

    Qwen3 follows the most recent ``/think`` or ``/no_think`` in user or system messages.
    Messages are scanned from the latest backwards; the first user or system message
    holding either tag decides, and within it the tag that comes last. The switch cannot
    turn thinking on when ``enable_thinking`` is False (as Qwen documents: the hard switch
    wins). Content may be a string or a list of ``{"type": "text", "text": ...}`` parts.
    """
    if not enable_thinking:
        return False
    for message in reversed(messages):
        if message.get("role") not in ("user", "system"):
            continue
        tags = _SOFT_SWITCH.findall(_text_of(message.get("content")))
        if tags:
            return tags[-1] == "think"
    return True


def effective_enable_thinking(enable_thinking: bool, thinking_budget: int | None) -> bool:
    """The ``enable_thinking`` to render the chat template with.

    A budget of 0 means no thinking tokens at all; the only way to guarantee that (the
    model writes `<think>` as its very first token) is the template's non-thinking prompt.
    ``thinking_budget`` None means unlimited.
    """
    return enable_thinking and thinking_budget != 0


def early_stop_token_ids(tokenizer: _Tokenizer) -> list[int]:
    """:data:`EARLY_STOP_TEXT` as token ids; they include the `</think>` token."""
    think_end = tokenizer.token_to_id("</think>")
    if think_end is None:
        raise ValueError("this tokenizer has no </think> token: its model cannot think")
    return list(tokenizer.encode(EARLY_STOP_TEXT))


class Phase(enum.Enum):
    """Where a generated sequence stands in Qwen's thinking protocol."""

    BEFORE_THINKING = "before_thinking"  # the model may still open thinking: only whitespace so far
    THINKING = "thinking"
    ANSWER = "answer"  # thinking is over, or will never come


class Role(enum.Enum):
    """What one generated token is to the thinking protocol."""

    OPEN = "open"  # the `<think>` that opens thinking
    THINKING = "thinking"  # a token inside thinking
    CLOSE = "close"  # the `</think>` that closes it
    ANSWER = "answer"  # answer text (whitespace before thinking included; a late `<think>` too)


def initial_phase(prompt_token_ids: Sequence[int], ids: SpecialIds) -> Phase:
    """Where the output of ``prompt_token_ids`` begins, from the generation turn (the
    tokens after the prompt's last `<|im_start|>`; the whole prompt for a vocabulary
    without one):

    * it ends inside an unclosed `<think>` (QwQ's and the Qwen3 *-Thinking* templates
      pre-fill `<think>\\n`): THINKING;
    * it holds a closed `<think>...</think>` (Qwen3's template with ``enable_thinking=False``
      pre-fills an empty one): ANSWER, this turn's thinking is written;
    * otherwise BEFORE_THINKING: the model may open thinking (the Qwen3 template with
      thinking on; earlier turns' thinking in the history does not count);
    * a vocabulary without think tokens (Qwen2.5): always ANSWER.
    """
    if not ids.has_thinking:
        return Phase.ANSWER
    start = 0
    if ids.turn_start is not None:
        for i in range(len(prompt_token_ids) - 1, -1, -1):
            if prompt_token_ids[i] == ids.turn_start:
                start = i + 1
                break
    for i in range(len(prompt_token_ids) - 1, start - 1, -1):
        if prompt_token_ids[i] == ids.think_end:
            return Phase.ANSWER
        if prompt_token_ids[i] == ids.think_start:
            return Phase.THINKING
    return Phase.BEFORE_THINKING


class ThinkingState:
    """One generated sequence's place in the thinking protocol, advanced one token id at a
    time, with the role of every token it has seen.

    Rules, on token ids:

    * BEFORE_THINKING: `<think>` opens thinking (role OPEN); a whitespace-only token keeps
      the sequence before thinking (role ANSWER: it is answer text if thinking never
      opens); any other token starts the answer, and a `<think>` after it is answer text.
    * THINKING: `</think>` closes it (role CLOSE); every other token, marker or not, is a
      thinking token (role THINKING). Thinking opens at most once.
    * ANSWER: every token is answer text.

    ``num_thinking_tokens`` counts the THINKING tokens (not the markers), forced ones
    included. (The output parser counts OpenAI's ``reasoning_tokens``, markers included,
    from the roles of the tokens the output holds.)

    One instance per sequence, owned by the sequence's control: the engine advances it
    with each token (:meth:`advance`); the output parser, on another thread and never
    ahead of the engine, reads each token's role back (:meth:`role_at`). The engine does
    not show a control the token that ends a sequence, so the reader advances the state
    past that one itself.
    """

    def __init__(self, ids: SpecialIds, phase: Phase):
        if phase is not Phase.ANSWER and not ids.has_thinking:
            raise ValueError("a vocabulary without think tokens has no thinking")
        self.ids = ids
        self.phase = phase
        self.roles: list[Role] = []  # of every token seen, in order (append-only)
        self.num_thinking_tokens = 0

    @classmethod
    def for_prompt(cls, prompt_token_ids: Sequence[int], ids: SpecialIds) -> ThinkingState:
        return cls(ids, initial_phase(prompt_token_ids, ids))

    def advance(self, token_id: int) -> Role:
        """Take the next generated token (sampled or forced); return its role."""
        role = self._role(token_id)
        self.roles.append(role)
        if role is Role.THINKING:
            self.num_thinking_tokens += 1
        return role

    def role_at(self, index: int, token_id: int) -> Role:
        """The role of the output's token ``index`` (``token_id``), advancing to it when it
        is the next token the state has not seen."""
        if index == len(self.roles):
            return self.advance(token_id)
        if index > len(self.roles):
            raise ValueError(f"token {index} read before token {len(self.roles)}")
        return self.roles[index]

    def _role(self, token_id: int) -> Role:
        ids = self.ids
        if self.phase is Phase.THINKING:
            if token_id == ids.think_end:
                self.phase = Phase.ANSWER
                return Role.CLOSE
            return Role.THINKING
        if self.phase is Phase.BEFORE_THINKING:
            if token_id == ids.think_start:
                self.phase = Phase.THINKING
                return Role.OPEN
            if token_id not in ids.whitespace:
                self.phase = Phase.ANSWER
        return Role.ANSWER


class ThinkingBudget:
    """Caps one sequence's thinking at ``budget`` tokens, read from its :class:`ThinkingState`.

    After every token the state has taken (sampled or forced), the engine asks
    :meth:`after_token` for token ids to append next without sampling (almost always
    ``[]``).

    Counting: the state's thinking tokens, so a `<think>` opens the count wherever the
    state says thinking opens (after leading whitespace too), and the prompt may have
    opened it. When the count reaches ``budget`` without a `</think>`,
    ``early_stop_token_ids`` are returned, exactly once: the output then holds exactly
    ``budget`` thinking tokens followed by the early-stop text, whose `</think>` closes
    thinking. A `</think>` the model writes itself ends thinking and nothing is forced.

    Budget 0: render the template with ``enable_thinking=False``
    (:func:`effective_enable_thinking`) so the model never opens thinking. If thinking
    opens anyway (a template that ignores ``enable_thinking``), the early stop is forced
    at once; a prompt that opened thinking itself (QwQ's) gets the early stop appended
    to the prompt (:func:`close_thinking`).

    ``max_tokens`` is separate: it counts every generated token, thinking, forced and
    answer alike. When it ends generation first (forced tokens included, which the engine
    then cuts short), the finish reason is "length".
    """

    def __init__(self, budget: int, state: ThinkingState, early_stop_token_ids: Sequence[int]):
        if state.ids.think_end not in early_stop_token_ids:
            raise ValueError("early_stop_token_ids must contain the </think> token")
        self.budget = budget
        self.state = state
        self.early_stop_token_ids = list(early_stop_token_ids)
        self.is_triggered = False  # the early stop was forced

    def after_token(self) -> list[int]:
        """The tokens to force next, once the state has taken a token."""
        if self.is_triggered or self.state.phase is not Phase.THINKING:
            return []
        if self.state.num_thinking_tokens < self.budget:
            return []
        self.is_triggered = True
        return list(self.early_stop_token_ids)


def close_thinking(prompt_token_ids: list[int], ids: SpecialIds, tokenizer: _Tokenizer) -> list[int]:
    """The prompt of a request with thinking budget 0: when the template opened thinking
    (QwQ's always does), the early stop is appended so that thinking is closed before the
    first token."""
    if initial_phase(prompt_token_ids, ids) is Phase.THINKING:
        return prompt_token_ids + early_stop_token_ids(tokenizer)
    return prompt_token_ids


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "\n".join(
            part.get("text", "") for part in content if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""
