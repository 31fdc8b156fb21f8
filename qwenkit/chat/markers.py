"""The token ids Qwen's chat protocol is read on: its marker tokens and its whitespace.

`<think>`, `</think>`, `<tool_call>` and `</tool_call>` are single tokens, so thinking and
tool calls are tracked on token ids, never by searching decoded text (which a model can
spell out in its answer). Whitespace-only tokens matter too: a `<think>` that follows only
whitespace still opens thinking. No torch.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwenkit.tokenizer import Tokenizer

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TURN_START = "<|im_start|>"  # ChatML: every turn, the generation prompt's included, opens with it


@dataclass(frozen=True)
class SpecialIds:
    """The marker token ids of a vocabulary; None where it has no such token (Qwen2.5 has
    no think tokens). ``whitespace``: the ids whose text is only whitespace."""

    think_start: int | None = None
    think_end: int | None = None
    tool_call_start: int | None = None
    tool_call_end: int | None = None
    turn_start: int | None = None
    whitespace: frozenset[int] = field(default=frozenset(), repr=False)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> SpecialIds:
        """The tokenizer's ids, computed once per tokenizer (finding the whitespace tokens
        decodes the whole vocabulary: ~0.2 s for Qwen's 151,936 tokens)."""
        ids = _CACHE.get(tokenizer)
        if ids is None:
            ids = _CACHE[tokenizer] = cls(
                think_start=tokenizer.token_to_id(THINK_START),
                think_end=tokenizer.token_to_id(THINK_END),
                tool_call_start=tokenizer.token_to_id(TOOL_CALL_START),
                tool_call_end=tokenizer.token_to_id(TOOL_CALL_END),
                turn_start=tokenizer.token_to_id(TURN_START),
                whitespace=whitespace_token_ids(tokenizer),
            )
        return ids

    @property
    def has_thinking(self) -> bool:
        return self.think_start is not None and self.think_end is not None

    @property
    def has_tool_calls(self) -> bool:
        return self.tool_call_start is not None and self.tool_call_end is not None


def whitespace_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The ids whose own text is whitespace only (str.isspace: spaces, tabs, newlines...)."""
    backend = tokenizer.backend
    num_tokens = backend.get_vocab_size(with_added_tokens=True)
    texts = backend.decode_batch([[i] for i in range(num_tokens)], skip_special_tokens=False)
    return frozenset(i for i, text in enumerate(texts) if text.isspace())


_CACHE: weakref.WeakKeyDictionary[Tokenizer, SpecialIds] = weakref.WeakKeyDictionary()
