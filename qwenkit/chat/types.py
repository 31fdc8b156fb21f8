"""What a chat request returns: the final completion, and the chunks of a stream.

Plain dataclasses shaped after OpenAI's chat completion objects, so the server's
protocol modules only rename and nest fields. No torch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qwenkit.engine.llm_engine import TokenOutput

FINISH_REASONS = ("stop", "length", "tool_calls")


def new_tool_call_id() -> str:
    """``call_`` and 24 random hex digits, the shape OpenAI's ids have."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    """One function call the model made. ``arguments`` is a JSON object as text."""

    id: str
    name: str
    arguments: str
    type: str = "function"

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of the tool call at ``index`` in a stream.

    As in OpenAI streams, the first piece of a call carries its ``id`` and ``name``; later
    pieces (if any) carry only ``arguments`` fragments, and a client concatenates those.
    A client may get pieces without an index from other servers (`ToolCallAccumulator`).
    """

    index: int | None
    id: str | None
    name: str | None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        if self.name is not None:
            function["name"] = self.name
        out["function"] = function
        return out


@dataclass
class ChatDelta:
    """The text (and tool-call pieces) one step of a stream adds; empty fields add nothing."""

    reasoning_content: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning_content or self.content or self.tool_calls)

    def extend(self, other: ChatDelta) -> None:
        """Append ``other`` to this delta (texts concatenated, tool-call pieces appended)."""
        self.reasoning_content += other.reasoning_content
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


class ToolCallAccumulator:
    """The tool calls that a stream's `ToolCallDelta`s add up to, the same for every
    protocol and both ends (the server's OpenAI and DashScope answers, the client's
    streams): pieces are grouped by `index`; a call's `id` and `name` are the first
    non-empty ones its pieces carry (servers differ in which piece has them: the first,
    a later one, or every one); `arguments` are concatenated. A piece without an index
    continues the latest call unless its id names another one."""

    def __init__(self) -> None:
        self._calls: dict[int, list[Any]] = {}  # index -> [id, name, arguments pieces]
        self._made_ids: dict[int, str] = {}
        self._last: int | None = None

    def __bool__(self) -> bool:
        return bool(self._calls)

    def add(self, delta: ToolCallDelta) -> None:
        index = delta.index
        if index is None:
            latest = self._calls.get(self._last) if self._last is not None else None
            is_new = latest is None or (delta.id and latest[0] not in (None, delta.id))
            index = max(self._calls, default=-1) + 1 if is_new else self._last
        call = self._calls.setdefault(index, [None, None, []])
        call[0] = call[0] or delta.id or None
        call[1] = call[1] or delta.name or None
        call[2].append(delta.arguments or "")
        self._last = index

    def indexed(self) -> list[tuple[int, ToolCall]]:
        """(index, call) so far, by index. A call none of whose pieces has carried an id yet
        is given one, the same each time, until a piece brings its own."""
        return [(i, ToolCall(id or self._made_ids.setdefault(i, new_tool_call_id()), name or "", "".join(args)))
                for i, (id, name, args) in sorted(self._calls.items())]

    def calls(self) -> list[ToolCall]:
        return [call for _, call in self.indexed()]


class ChoiceAccumulator:
    """One choice of a streamed answer gathered from its `ChatChunk`s: the whole answer
    the server's protocols write (or, for DashScope without incremental_output, the answer
    so far)."""

    def __init__(self) -> None:
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self.tool_calls = ToolCallAccumulator()
        self.finish_reason: str | None = None
        self.logprobs: list[TokenOutput] | None = None

    def add(self, chunk: ChatChunk) -> None:
        self._reasoning.append(chunk.delta.reasoning_content)
        self._content.append(chunk.delta.content)
        for piece in chunk.delta.tool_calls:
            self.tool_calls.add(piece)
        if chunk.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(chunk.logprobs)
        self.finish_reason = chunk.finish_reason or self.finish_reason

    def texts(self) -> tuple[str, str]:
        """(reasoning_content, content) so far."""
        return "".join(self._reasoning), "".join(self._content)


@dataclass(frozen=True)
class Usage:
    """Token counts of one request. ``reasoning_tokens`` and ``cached_tokens`` are parts
    of ``completion_tokens`` and ``prompt_tokens`` respectively, as in OpenAI's usage."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }


@dataclass
class ChatCompletion:
    """The whole answer to a chat request.

    ``content`` / ``reasoning_content`` are None when the model wrote none (a reply that
    is only tool calls, or a model that did not think). ``finish_reason`` is one of
    :data:`FINISH_REASONS`.
    """

    content: str | None
    reasoning_content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str
    usage: Usage
    request_id: str = ""


@dataclass
class ChatChunk:
    """One piece of a streamed chat answer. The last chunk of each of the n choices has
    its finish_reason; the request's last chunk also carries the usage. When the request
    asked for logprobs, `logprobs` holds this piece's generated tokens (reasoning and
    tool-call tokens included; a token the server forced, such as the close of thinking at
    the thinking budget, has logprob None); otherwise it is None."""

    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenOutput] | None = None
