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
    """

    index: int
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
