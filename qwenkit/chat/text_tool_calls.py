"""Tool calls a model writes as plain text, without `<tool_call>` markers.

Small Qwen models (the default Qwen2.5-Coder-0.5B among them) answer a request that
offers tools with the call as a bare JSON object or in a fenced ```json block, not in
the `<tool_call>` tokens the chat template asks for (8 of 8 samples). Ollama and
llama.cpp accept those forms from Qwen models; so does qwenkit, under rules narrow
enough that an ordinary answer is never mistaken for a call:

* The form starts a line of the answer (only spaces or tabs before it on its line):
  a JSON object ``{...}``, or a fence whose opening line is ```` ``` ```` or
  ```` ```json ```` and whose body is one JSON object, closed by a ```` ``` ```` line.
* The object has exactly two keys: ``name``, one of the functions the request offered,
  and ``arguments`` (or ``parameters``), a JSON object.
* Anything else, and any JSON inside another fence (```` ```python ````...), is answer
  text, released as soon as it is known not to be a call.

:class:`TextToolCallScanner` decides on a stream of text: it holds back what may still
become a call and releases it as text the moment it cannot. No torch.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True)
class TextToolCall:
    """A call found in the text; ``arguments`` is ``json.dumps`` of an object."""

    name: str
    arguments: str


# What feed/flush return, in order: text for the answer, or a call.
Piece = str | TextToolCall

# Where the scanner is: in plain text; in a line-starting object; on a fence's opening
# line; in a ```json fence before its object, in the object, or after it (closing line).
_TEXT, _JSON, _FENCE_OPEN, _FENCE_START, _FENCE_JSON, _FENCE_END = range(6)
_FENCE = "```"
_WHITESPACE = " \t\r\n"
_CALL_KEYS = ("name", "arguments", "parameters")


def parse_text_tool_call(text: str, tool_names: Collection[str]) -> TextToolCall | None:
    """The call ``text`` holds (a whole JSON object, see the module doc), or None."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or len(obj) != 2 or obj.get("name") not in tool_names:
        return None
    arguments = obj.get("arguments", obj.get("parameters"))
    if not isinstance(arguments, dict):
        return None
    return TextToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


class TextToolCallScanner:
    """Splits answer text into text and tool calls written as JSON, as it streams.

    Text that may still become a call is held back: from a line-starting ``{`` until
    the object closes (or its first key is not ``name`` / ``arguments`` / ``parameters``),
    from a line-starting ```` ``` ```` until the fence's language is known, and a ```json
    fence until its closing line. Everything else passes through at once."""

    def __init__(self, tool_names: Collection[str]):
        self.tool_names = frozenset(tool_names)
        self._state = _TEXT
        self._held: list[str] = []  # the candidate's text so far
        self._line_start = True  # only spaces / tabs since the last newline
        self._in_other_fence = False  # inside a fence that is answer text: no candidates
        self._object_at = 0  # where the object starts in the held text
        self._object_end = 0  # and where it ended (fenced objects)
        self._fence_line: list[str] = []  # the current line after a fenced object
        # The object's JSON structure: nesting depth, string state, its first key.
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._before_key = False  # only whitespace since the opening brace
        self._key: list[str] | None = None  # the first key while it is being read

    def feed(self, text: str) -> list[Piece]:
        """The pieces ``text`` completes, in order."""
        out: list[Piece] = []
        for char in text:
            if self._state == _TEXT:
                self._text_char(char, out)
            else:
                self._held.append(char)
                self._candidate_char(char, out)
        return out

    def flush(self) -> list[Piece]:
        """End of the answer (or a `<tool_call>` marker): decide on what is held; a
        ```json fence whose object is complete counts even without its closing line."""
        out: list[Piece] = []
        if self._state == _FENCE_END:
            self._decide(out)
        elif self._state != _TEXT:
            self._release(out)
        self._line_start = True
        return out

    # -- the state machine ---------------------------------------------------------------

    def _text_char(self, char: str, out: list[Piece]) -> None:
        if self._line_start and char == "`":
            self._hold(_FENCE_OPEN, char)
        elif self._line_start and char == "{" and not self._in_other_fence:
            self._hold(_JSON, char)
            self._start_object(0)
        else:
            _text(out, char)
            if char == "\n":
                self._line_start = True
            elif char not in " \t":
                self._line_start = False

    def _candidate_char(self, char: str, out: list[Piece]) -> None:
        if self._state in (_JSON, _FENCE_JSON):
            self._object_char(char, out)
        elif self._state == _FENCE_OPEN:
            self._fence_open_char(char, out)
        elif self._state == _FENCE_START:
            if char == "{":
                self._state = _FENCE_JSON
                self._start_object(len(self._held) - 1)
            elif char not in _WHITESPACE:  # a fence of other text: its closing line opens no fence
                self._in_other_fence = True
                self._release(out)
        else:  # _FENCE_END: only whitespace, then the closing ``` line
            self._fence_end_char(char, out)

    def _hold(self, state: int, char: str) -> None:
        self._state = state
        self._held = [char]

    def _start_object(self, at: int) -> None:
        self._object_at = at
        self._depth, self._in_string, self._escaped = 1, False, False
        self._before_key, self._key = True, None

    def _object_char(self, char: str, out: list[Piece]) -> None:
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
                if self._key is not None:  # the first key is read: only a call's keys may follow
                    key, self._key = "".join(self._key), None
                    if key not in _CALL_KEYS:
                        self._not_a_call(out)
            elif self._key is not None:
                self._key.append(char)
            return
        if self._before_key and char not in _WHITESPACE:
            self._before_key = False
            if char != '"':  # an object's first key is a string: `{` then anything else is code
                self._not_a_call(out)
                return
            self._key = []
        if char == '"':
            self._in_string = True
        elif char == "{":
            self._depth += 1
        elif char == "}":
            self._depth -= 1
            if self._depth == 0:
                self._object_end = len(self._held)
                if self._state == _JSON:
                    self._decide(out)
                    self._line_start = False
                else:
                    self._state, self._fence_line = _FENCE_END, []

    def _fence_open_char(self, char: str, out: list[Piece]) -> None:
        length = len(self._held)
        if length <= len(_FENCE):
            if char != "`":
                self._release(out)
                self._line_start = char == "\n"
            return
        if char != "\n":
            return
        info = "".join(self._held[len(_FENCE) : -1]).strip().lower()
        if self._in_other_fence:  # a bare ``` line closes it; anything else is its text
            self._in_other_fence = info != ""
            self._release(out)
        elif info in ("", "json"):
            self._state = _FENCE_START
        else:
            self._in_other_fence = True
            self._release(out)
        self._line_start = True

    def _fence_end_char(self, char: str, out: list[Piece]) -> None:
        line = "".join(self._fence_line).strip()
        if char == "\n":
            if line == _FENCE:
                self._decide(out)
                self._line_start = True
            self._fence_line = []  # a blank line: the closing one may follow
            return
        self._fence_line.append(char)
        if not _FENCE.startswith(line + char.strip()):
            self._in_other_fence = True  # more than the object in the fence: all of it is text
            self._release(out)

    def _not_a_call(self, out: list[Piece]) -> None:
        if self._state == _FENCE_JSON:
            self._in_other_fence = True  # the fence goes on as text
        self._release(out)
        self._line_start = False

    def _decide(self, out: list[Piece]) -> None:
        held = "".join(self._held)
        call = parse_text_tool_call(held[self._object_at : self._object_end], self.tool_names)
        if call is None:
            if self._state == _FENCE_END and not held.rstrip().endswith(_FENCE):
                self._in_other_fence = True  # flushed before its closing line
            self._release(out)
        else:
            out.append(call)
            self._state, self._held = _TEXT, []

    def _release(self, out: list[Piece]) -> None:
        _text(out, "".join(self._held))
        self._state, self._held = _TEXT, []


def _text(out: list[Piece], text: str) -> None:
    if not text:
        return
    if out and isinstance(out[-1], str):
        out[-1] += text
    else:
        out.append(text)
