"""Qwen output -> reasoning, answer and tool calls, one token at a time.

Qwen3 writes::

    <think>\\n...reasoning...\\n</think>\\n\\nanswer\\n<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>

`<think>`, `</think>`, `<tool_call>` and `</tool_call>` are single tokens, so every
decision is made on token ids, never by searching the decoded text (which a model can
spell out in its answer). Decisions, all documented on :class:`OutputParser`:

* Where thinking is, the sequence's :class:`~qwenkit.chat.thinking.ThinkingState` says
  (the same one the thinking budget and the grammar gate read): a `<think>` after only
  whitespace opens it, or the prompt already did; a later `<think>` is answer text.
* Newlines that frame the reasoning and those that lead the answer are dropped, as the
  chat template drops them from history; trailing newlines are held back while streaming
  until it is known whether more text follows.
* Tool calls are parsed only after thinking and only when the request has tools. A call
  is streamed as one :class:`ToolCallDelta` (id, name and the whole arguments) when its
  `</tool_call>` arrives: until then the block could still turn out malformed, and a
  malformed block is answer text, not a call. Streamed and final results agree exactly.
* Calls written as plain JSON, without the markers (small models do), are found in the
  answer text by :mod:`qwenkit.chat.text_tool_calls`, which holds back what may become a call.

No torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from qwenkit.chat.markers import THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START, SpecialIds
from qwenkit.chat.text_tool_calls import TextToolCall, TextToolCallScanner
from qwenkit.chat.thinking import Role, ThinkingState
from qwenkit.chat.types import ChatCompletion, ChatDelta, ToolCall, ToolCallDelta, Usage, new_tool_call_id


@dataclass
class ChatCompletionParts:
    """What :meth:`OutputParser.finish` knows of the final result; the engine adds usage."""

    content: str | None
    reasoning_content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    reasoning_tokens: int = 0

    def to_completion(
        self, *, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, request_id: str = ""
    ) -> ChatCompletion:
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            reasoning_tokens=self.reasoning_tokens,
            cached_tokens=cached_tokens,
        )
        return ChatCompletion(
            content=self.content,
            reasoning_content=self.reasoning_content,
            tool_calls=list(self.tool_calls),
            finish_reason=self.finish_reason,
            usage=usage,
            request_id=request_id,
        )


class OutputParser:
    """Splits one request's generated tokens into reasoning, content and tool calls.

    Feed every generated token, forced ones included, with the text the detokenizer
    returned for it (``""`` while it holds back bytes; the held text then arrives with a
    later token). Concatenating the streamed deltas gives exactly the final result:
    ``reasoning_content`` and ``content`` texts, and for each tool-call index the id, name
    and concatenated ``arguments``.

    Rules:

    * **Thinking** is where ``thinking`` (the sequence's state, see
      :class:`~qwenkit.chat.thinking.ThinkingState`) says it is: a `<think>` after only
      whitespace (the whitespace is dropped), or from the first token when the prompt
      opened it, until `</think>`. While thinking, every token is reasoning text, tool-call
      markers included. Leading newlines of the reasoning and the newlines before
      `</think>` are dropped; if thinking never closes, all of it is reasoning (trailing
      newlines dropped) and the content is None.
    * **Content**: leading newlines are dropped; trailing whitespace is held back while
      streaming and flushed at :meth:`finish`, unless only whitespace followed the last
      tool call.
    * **Tool calls** (only with ``parse_tool_calls`` and a vocabulary that has the
      markers): a `<tool_call>` ... `</tool_call>` block in the content must hold a JSON
      object ``{"name": str, "arguments": object}`` (``parameters`` for ``arguments`` is
      accepted too; ``arguments`` may also be a string holding a JSON object, or missing
      for ``{}``). A call is streamed as one
      :class:`ToolCallDelta` carrying id, name and the whole ``arguments``, compact
      ``json.dumps(arguments, ensure_ascii=False)``, when its block closes. A block that
      does not parse, or never closes, is content text (markers included). Whitespace
      around calls is dropped.
    * **Calls written as text** (only with ``parse_tool_calls`` and ``tool_names``, the
      offered functions): a bare JSON object or a ```json fence starting a line of the
      content, ``{"name": <offered>, "arguments"|"parameters": object}``, is a call
      (:mod:`qwenkit.chat.text_tool_calls` has the exact rules); its text is held back until
      that is decided, and released as content when it is not a call.
    * **Marker text never leaks**: a marker token that acts as a marker contributes only
      the text the detokenizer held back before it.
    * ``reasoning_tokens``: every token from the opening `<think>` through the closing
      `</think>`, both markers included (every token up to `</think>` when the prompt
      opened thinking; every remaining token when thinking never closes). Tokens an
      engine forces inside thinking (a thinking budget's early stop) are included.
    """

    def __init__(self, thinking: ThinkingState, *, parse_tool_calls: bool, tool_names: frozenset[str] = frozenset()):
        self.thinking = thinking
        self.ids: SpecialIds = thinking.ids
        self.parse_tool_calls = parse_tool_calls and self.ids.has_tool_calls
        # Finds calls written as JSON text in the content; None: content is only text.
        self._text_calls = TextToolCallScanner(tool_names) if parse_tool_calls and tool_names else None
        self._num_tokens = 0  # fed so far: the index of the next token in the sequence's output
        self._in_tool_call = False
        self.reasoning_tokens = 0
        self.tool_calls: list[ToolCall] = []
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._held_newlines = ""  # trailing reasoning newlines: dropped if `</think>` follows
        self._held_space = ""  # trailing content whitespace: dropped if a tool call follows
        self._after_tool_call = False  # no content since the last tool call
        self._block: list[str] = []  # text of an open `<tool_call>` block
        self._finished = False

    @property
    def reasoning_content(self) -> str:
        """The reasoning streamed so far."""
        return "".join(self._reasoning)

    @property
    def content(self) -> str:
        """The content streamed so far."""
        return "".join(self._content)

    def feed(self, token_id: int, text: str) -> ChatDelta:
        """One generated token and the text it completed; returns what to stream now."""
        if self._finished:
            raise RuntimeError("OutputParser.feed after finish")
        delta = ChatDelta()
        role = self.thinking.role_at(self._num_tokens, token_id)
        self._num_tokens += 1
        if role is not Role.ANSWER:
            self.reasoning_tokens += 1
        if role is Role.THINKING:
            self._add_reasoning(text, delta)
        elif role is Role.CLOSE:
            self._add_reasoning(_before_marker(text, THINK_END), delta)
            self._held_newlines = ""
        elif role is Role.OPEN:  # only whitespace came before: dropped
            self._add_content(_before_marker(text, THINK_START), delta)
            self._flush_text_calls(delta)
            self._held_space = ""
        elif self._in_tool_call:
            if token_id == self.ids.tool_call_end:
                self._block.append(_before_marker(text, TOOL_CALL_END))
                self._close_tool_call(delta)
            else:
                self._block.append(text)
        elif token_id == self.ids.tool_call_start and self.parse_tool_calls:
            self._add_content(_before_marker(text, TOOL_CALL_START), delta)
            self._flush_text_calls(delta)
            self._block = []
            self._in_tool_call = True
        else:
            self._add_content(text, delta)
        return delta

    def finish(self, finish_reason: str) -> tuple[ChatDelta, ChatCompletionParts]:
        """Flush what was held back; return the last delta and the final result.

        ``finish_reason`` is the engine's ("stop" or "length"); a "stop" becomes
        "tool_calls" when the output held tool calls.
        """
        if self._finished:
            raise RuntimeError("OutputParser.finish called twice")
        self._finished = True
        delta = ChatDelta()
        if self._in_tool_call:  # never closed: its text is content
            self._in_tool_call = False
            self._add_content(TOOL_CALL_START + "".join(self._block), delta)
        self._flush_text_calls(delta)
        self._held_newlines = ""
        if self._content and not self._after_tool_call and self._held_space:
            self._emit_content(self._held_space, delta)
        self._held_space = ""
        if self.tool_calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        parts = ChatCompletionParts(
            content=self.content or None,
            reasoning_content=self.reasoning_content or None,
            tool_calls=list(self.tool_calls),
            finish_reason=finish_reason,
            reasoning_tokens=self.reasoning_tokens,
        )
        return delta, parts

    def _add_reasoning(self, text: str, delta: ChatDelta) -> None:
        if not text:
            return
        text = self._held_newlines + text
        if not self._reasoning:
            text = text.lstrip("\n")
        shown = text.rstrip("\n")
        self._held_newlines = text[len(shown) :]
        if shown:
            self._reasoning.append(shown)
            delta.reasoning_content += shown

    def _add_content(self, text: str, delta: ChatDelta) -> None:
        if self._text_calls is None:
            self._add_text(text, delta)
        else:
            self._add_pieces(self._text_calls.feed(text), delta)

    def _flush_text_calls(self, delta: ChatDelta) -> None:
        if self._text_calls is not None:
            self._add_pieces(self._text_calls.flush(), delta)

    def _add_pieces(self, pieces: list[str | TextToolCall], delta: ChatDelta) -> None:
        for piece in pieces:
            if isinstance(piece, TextToolCall):
                self._add_tool_call(piece.name, piece.arguments, delta)
            else:
                self._add_text(piece, delta)

    def _add_text(self, text: str, delta: ChatDelta) -> None:
        if not text:
            return
        text = self._held_space + text
        shown = text.rstrip()
        self._held_space = text[len(shown) :]
        if not shown:
            return
        if not self._content:
            shown = shown.lstrip("\n")
        self._emit_content(shown, delta)

    def _emit_content(self, text: str, delta: ChatDelta) -> None:
        self._content.append(text)
        delta.content += text
        self._after_tool_call = False

    def _close_tool_call(self, delta: ChatDelta) -> None:
        raw = "".join(self._block)
        self._block = []
        self._in_tool_call = False
        parsed = parse_tool_call(raw)
        if parsed is None:
            self._add_content(TOOL_CALL_START + raw + TOOL_CALL_END, delta)
            return
        self._add_tool_call(*parsed, delta)

    def _add_tool_call(self, name: str, arguments: str, delta: ChatDelta) -> None:
        call = ToolCall(id=new_tool_call_id(), name=name, arguments=arguments)
        delta.tool_calls.append(ToolCallDelta(index=len(self.tool_calls), id=call.id, name=name, arguments=arguments))
        self.tool_calls.append(call)
        self._held_space = ""  # the newline the template puts before a call
        self._after_tool_call = True


def parse_tool_call(text: str) -> tuple[str, str] | None:
    """``(name, arguments JSON)`` from the text inside a `<tool_call>` block, or None when
    it is not ``{"name": str, "arguments": object}`` (or ``"parameters"``)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    arguments: Any = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # some fine-tunes write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return name, json.dumps(arguments, ensure_ascii=False)


def _before_marker(text: str, marker: str) -> str:
    """The part of a marker token's text that the detokenizer held back from earlier
    tokens (usually ""): everything before the marker's own text."""
    at = text.rfind(marker)
    return text[:at] if at >= 0 else text
