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
    """A call found in the text; ``arguments`` is compact JSON of an object."""

    name: str
    arguments: str


# What feed/flush return, in order: text for the answer, or a call.
Piece = str | TextToolCall

_NO, _JSON, _FENCE_OPEN, _FENCE_BODY = "no", "json", "fence_open", "fence_body"
_FENCE = "```"


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
    """Splits answer text into text and tool calls written as JSON, as it streams."""

    def __init__(self, tool_names: Collection[str]):
        self.tool_names = frozenset(tool_names)
        self._state = _NO
        self._held: list[str] = []  # the candidate so far
        self._line_start = True  # only spaces / tabs since the last newline
        self._in_other_fence = False  # inside a fence that is answer text: no candidates
        # JSON scanning of a bare-object candidate.
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._keyed = False  # the first non-space character after `{` was seen
        self._body_at = 0  # where a fence's body starts in the held text

    def feed(self, text: str) -> list[Piece]:
        """The pieces ``text`` completes; text that may still be a call is held back."""
        out: list[Piece] = []
        for char in text:
            self._step(char, out)
        return out

    def flush(self) -> list[Piece]:
        """End of the answer (or a `<tool_call>` marker): decide on what is held."""
        out: list[Piece] = []
        if self._state == _FENCE_BODY:
            held = "".join(self._held)
            body = held[self._body_at :].rstrip()
            if body.endswith(_FENCE):  # closed on the last line, with no newline after it
                body = body[: -len(_FENCE)]
            self._decide(parse_text_tool_call(body, self.tool_names), out)
        elif self._state != _NO:
            self._release(out)
        self._line_start = True
        return out

    # -- the state machine ---------------------------------------------------------------

    def _step(self, char: str, out: list[Piece]) -> None:
        if self._state == _NO:
            self._outside(char, out)
        elif self._state == _JSON:
            self._held.append(char)
            self._scan_json(char, out)
        elif self._state == _FENCE_OPEN:
            self._held.append(char)
            self._scan_fence_open(char, out)
        else:
            self._held.append(char)
            if char == "\n":
                self._scan_fence_line(out)

    def _outside(self, char: str, out: list[Piece]) -> None:
        if self._line_start and char == "`":
            self._start(_FENCE_OPEN, char)
        elif self._line_start and char == "{" and not self._in_other_fence:
            self._start(_JSON, char)
            self._depth, self._in_string, self._escaped, self._keyed = 1, False, False, False
        else:
            _text(out, char)
            if char == "\n":
                self._line_start = True
            elif char not in " \t":
                self._line_start = False

    def _start(self, state: str, char: str) -> None:
        self._state = state
        self._held = [char]

    def _scan_json(self, char: str, out: list[Piece]) -> None:
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
            return
        if not self._keyed and char not in " \t\r\n":
            if char not in '"}':  # an object's first key is a string: `{` then anything else is code
                self._release(out)
                self._line_start = False
                return
            self._keyed = True
        if char == '"':
            self._in_string = True
        elif char == "{":
            self._depth += 1
        elif char == "}":
            self._depth -= 1
            if self._depth == 0:
                self._decide(parse_text_tool_call("".join(self._held), self.tool_names), out)
                self._line_start = False

    def _scan_fence_open(self, char: str, out: list[Piece]) -> None:
        held = "".join(self._held)
        if len(held) <= len(_FENCE):
            if char != "`":
                self._release(out)
                self._line_start = char == "\n"
            return
        if char != "\n":
            return
        info = held[len(_FENCE) :].strip().lower()
        if self._in_other_fence:  # this line closes it (or is text inside it)
            self._in_other_fence = info != ""
            self._release(out)
        elif info in ("", "json"):
            self._state = _FENCE_BODY
            self._body_at = len(held)
        else:
            self._in_other_fence = True
            self._release(out)
        self._line_start = True

    def _scan_fence_line(self, out: list[Piece]) -> None:
        """A line of a ```json fence ended: it may close the fence or rule out a call."""
        body = "".join(self._held)[self._body_at :]
        if not body.lstrip().startswith("{") and body.strip():
            self._in_other_fence = True  # a fence of other text: its closing line must not open one
            self._release(out)
            return
        *lines, line, _ = body.split("\n")
        if line.strip() == _FENCE:
            self._decide(parse_text_tool_call("\n".join(lines), self.tool_names), out)
            self._line_start = True

    def _decide(self, call: TextToolCall | None, out: list[Piece]) -> None:
        if call is None:
            self._release(out)
        else:
            out.append(call)
            self._state, self._held = _NO, []

    def _release(self, out: list[Piece]) -> None:
        _text(out, "".join(self._held))
        self._state, self._held = _NO, []


def _text(out: list[Piece], text: str) -> None:
    if not text:
        return
    if out and isinstance(out[-1], str):
        out[-1] += text
    else:
        out.append(text)
