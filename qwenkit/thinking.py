"""Separating Qwen3's thinking from its answer, decided on token ids.

Qwen3 writes `<think>\\n...reasoning...\\n</think>\\n\\nanswer`. The `<think>` and
`</think>` markers are single tokens, so the split is made on their ids, never by
searching the decoded text (which a model can spell out in its answer).
"""

from __future__ import annotations

from collections.abc import Sequence

THINK_START = "<think>"
THINK_END = "</think>"


class ThinkingSplitter:
    """Routes each generated token's text to `reasoning` or `content`, streaming.

    `feed` returns the (reasoning, content) text to show now. Newlines that frame the
    reasoning (after `<think>`, before `</think>`) and those before the answer are
    dropped, as Qwen's chat template drops them from history.
    """

    def __init__(self, think_start_id: int | None, think_end_id: int | None, *, in_thinking: bool = False):
        self.start_id = think_start_id
        self.end_id = think_end_id
        self.in_thinking = in_thinking
        self.reasoning = ""
        self.content = ""
        self._held_newlines = ""  # trailing reasoning newlines, dropped if `</think>` follows

    @classmethod
    def for_prompt(cls, tokenizer, prompt_token_ids: Sequence[int]) -> "ThinkingSplitter":
        """A splitter that starts in thinking when the prompt ends inside an open `<think>`
        (templates that pre-fill it, as QwQ's does)."""
        start, end = tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(THINK_END)
        last_start = _last_index(prompt_token_ids, start)
        in_thinking = last_start is not None and (_last_index(prompt_token_ids, end) or -1) < last_start
        return cls(start, end, in_thinking=in_thinking)

    def feed(self, token_id: int, text: str) -> tuple[str, str]:
        if token_id == self.end_id and self.end_id is not None and self.in_thinking:
            self.in_thinking = False
            self._held_newlines = ""
            return "", ""
        if token_id == self.start_id and self.start_id is not None and not self.in_thinking and not self.content:
            self.in_thinking = True
            return "", ""
        if self.in_thinking:
            if not self.reasoning:
                text = text.lstrip("\n")
            text = self._held_newlines + text
            shown = text.rstrip("\n")
            self._held_newlines = text[len(shown) :]
            self.reasoning += shown
            return shown, ""
        if not self.content:
            text = text.lstrip("\n")
        self.content += text
        return "", text


def _last_index(ids: Sequence[int], token_id: int | None) -> int | None:
    if token_id is None:
        return None
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == token_id:
            return i
    return None
