"""Choosing whether Qwen3 thinks, and capping how long.

* :func:`resolve_thinking_mode`: the request's ``enable_thinking`` and Qwen3's soft
  switch (``/think`` and ``/no_think`` in user or system messages).
* :func:`effective_enable_thinking`: a thinking budget of 0 means no thinking at all,
  which is rendering the chat template with ``enable_thinking=False`` (it pre-fills an
  empty `<think>\\n\\n</think>\\n\\n`).
* :class:`ThinkingBudget`: once the model has thought for ``budget`` tokens, the engine
  forces :data:`EARLY_STOP_TEXT` (the Qwen team's wording, ending in `</think>`) and the
  model goes on to answer.

No torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

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
    if thinking_budget is not None and thinking_budget < 0:
        raise ValueError(f"thinking_budget must be >= 0, got {thinking_budget}")
    return enable_thinking and thinking_budget != 0


def early_stop_token_ids(tokenizer: _Tokenizer) -> list[int]:
    """:data:`EARLY_STOP_TEXT` as token ids; they include the `</think>` token."""
    think_end = tokenizer.token_to_id("</think>")
    if think_end is None:
        raise ValueError("this tokenizer has no </think> token: its model cannot think")
    return list(tokenizer.encode(EARLY_STOP_TEXT))


_WAITING, _THINKING, _DONE = "waiting", "thinking", "done"


class ThinkingBudget:
    """Caps one request's thinking at ``budget`` tokens.

    The engine calls :meth:`on_start` once before the first token and :meth:`on_token`
    after every token it appends; each returns token ids it must append next, without
    sampling (almost always ``[]``).

    Counting: a *thinking token* is a sampled token generated while thinking is open and
    that is not `</think>`; the opening `<think>` is not one. Thinking is open from the
    first token when the prompt opened it (``starts_in_thinking``), otherwise only when
    the first generated token is `<think>` (a later `<think>` is answer text). When the
    count reaches ``budget`` without a `</think>`, ``early_stop_token_ids`` are returned,
    exactly once: the output then holds exactly ``budget`` thinking tokens followed by
    the early-stop text, whose `</think>` closes thinking. The forced tokens are not
    thinking tokens; passing them to :meth:`on_token` is allowed and changes nothing.
    A `</think>` the model writes itself ends the count and nothing is forced.

    Budget 0: render the template with ``enable_thinking=False``
    (:func:`effective_enable_thinking`) so the model never opens thinking. If thinking
    opens anyway (a `<think>` first token, or a prompt that opened it, as QwQ's does),
    the early stop is forced at once (from :meth:`on_start` for such a prompt).

    ``max_tokens`` is separate: it counts every generated token, thinking, forced and
    answer alike. When it ends generation first (forced tokens included, which the engine
    then cuts short), the finish reason is "length".

    A vocabulary without think tokens (``think_end_id`` None) makes the budget inert.
    """

    def __init__(
        self,
        budget: int,
        *,
        think_start_id: int | None,
        think_end_id: int | None,
        early_stop_token_ids: Sequence[int],
        starts_in_thinking: bool,
    ):
        if budget < 0:
            raise ValueError(f"thinking budget must be >= 0, got {budget}")
        if think_end_id is not None and think_end_id not in early_stop_token_ids:
            raise ValueError("early_stop_token_ids must contain the </think> token")
        self.budget = budget
        self.think_start_id = think_start_id
        self.think_end_id = think_end_id
        self.early_stop_token_ids = list(early_stop_token_ids)
        if think_end_id is None:
            self._state = _DONE
        else:
            self._state = _THINKING if starts_in_thinking else _WAITING
        self.num_thinking_tokens = 0
        self.is_triggered = False  # the early stop was forced

    @classmethod
    def for_tokenizer(cls, budget: int, tokenizer: _Tokenizer, *, starts_in_thinking: bool) -> ThinkingBudget:
        return cls(
            budget,
            think_start_id=tokenizer.token_to_id("<think>"),
            think_end_id=tokenizer.token_to_id("</think>"),
            early_stop_token_ids=early_stop_token_ids(tokenizer),
            starts_in_thinking=starts_in_thinking,
        )

    @property
    def is_thinking(self) -> bool:
        return self._state == _THINKING

    def on_start(self) -> list[int]:
        """Tokens to force before the first sampled token (only for budget 0 with a prompt
        that already opened thinking)."""
        if self._state == _THINKING and self.budget == 0:
            return self._force()
        return []

    def on_token(self, token_id: int) -> list[int]:
        """After each appended token: the tokens to force next."""
        if self._state == _WAITING:
            if token_id != self.think_start_id:
                self._state = _DONE
                return []
            self._state = _THINKING
            return self._force() if self.budget == 0 else []
        if self._state != _THINKING:
            return []
        if token_id == self.think_end_id:
            self._state = _DONE
            return []
        self.num_thinking_tokens += 1
        if self.num_thinking_tokens >= self.budget:
            return self._force()
        return []

    def _force(self) -> list[int]:
        self._state = _DONE
        self.is_triggered = True
        return list(self.early_stop_token_ids)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "\n".join(
            part.get("text", "") for part in content if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""
