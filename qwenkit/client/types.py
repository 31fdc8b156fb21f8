"""The client's value types: options, responses, stream chunks. No torch.

Messages are OpenAI-style dicts (``{"role": ..., "content": ...}``); an assistant turn
may carry ``reasoning_content`` and ``tool_calls`` in OpenAI's nested shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ConfigDict

from qwenkit.chat.types import ToolCall, ToolCallDelta, Usage

__all__ = ["ChatOptions", "ChatResponse", "ChatResponseChunk", "ToolCall", "ToolCallDelta", "Usage",
           "ResponseAccumulator", "add_usage", "strip_reasoning"]

Message = dict[str, Any]


class ChatOptions(BaseModel):
    """How the model should answer. A field left None is not sent (the model's default applies).

    `merged(other)` lays the fields `other` sets over these: client defaults, then the
    request's options. `extra_body` carries anything else an endpoint takes."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    enable_thinking: bool | None = None
    thinking_budget: int | None = None
    response_format: dict[str, Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    extra_body: dict[str, Any] | None = None

    def merged(self, other: ChatOptions | dict[str, Any] | None) -> ChatOptions:
        """These options with the fields `other` sets (not None) laid over them."""
        if other is None:
            return self
        if isinstance(other, dict):
            other = ChatOptions(**other)
        data = self.model_dump()
        for name, value in other.model_dump().items():
            if value is None:
                continue
            if name == "extra_body" and data.get("extra_body"):
                value = {**data["extra_body"], **value}
            data[name] = value
        return ChatOptions(**data)


@dataclass
class ChatResponse:
    """One answer of a chat model, or the last answer of a tool loop.

    `messages` holds the turn's assistant and tool messages in order (the tool-call
    rounds, then the final answer), as chat memory stores them; `usage` is summed over
    the rounds. `metadata` is free for advisors."""

    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = "stop"
    usage: Usage | None = None
    model: str | None = None
    messages: list[Message] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_message(self) -> Message:
        """This answer as an assistant message (reasoning kept; memory strips it before reuse)."""
        message: Message = {"role": "assistant", "content": self.content}
        if self.reasoning_content:
            message["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            message["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return message

    def replace(self, **changes: Any) -> ChatResponse:
        return replace(self, **changes)


@dataclass
class ChatResponseChunk:
    """A piece of a streamed answer; the last piece has `finish_reason` (and usage if known)."""

    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None


def add_usage(a: Usage | None, b: Usage | None) -> Usage | None:
    if a is None or b is None:
        return a or b
    return Usage(a.prompt_tokens + b.prompt_tokens, a.completion_tokens + b.completion_tokens,
                 a.reasoning_tokens + b.reasoning_tokens, a.cached_tokens + b.cached_tokens)


class ResponseAccumulator:
    """Builds the `ChatResponse` a stream of chunks adds up to."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, list[Any]] = {}  # index -> [id, name, arguments pieces]
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def add(self, chunk: ChatResponseChunk) -> None:
        self.content.append(chunk.content)
        self.reasoning.append(chunk.reasoning_content)
        for delta in chunk.tool_calls:
            call = self.calls.setdefault(delta.index, [None, None, []])
            call[0] = call[0] or delta.id
            call[1] = call[1] or delta.name
            call[2].append(delta.arguments or "")
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.usage = chunk.usage or self.usage

    def response(self) -> ChatResponse:
        from qwenkit.chat.types import new_tool_call_id

        calls = [ToolCall(id or new_tool_call_id(), name or "", "".join(args))
                 for _, (id, name, args) in sorted(self.calls.items())]
        return ChatResponse(content="".join(self.content) or None, reasoning_content="".join(self.reasoning) or None,
                            tool_calls=calls, finish_reason=self.finish_reason, usage=self.usage)


def strip_reasoning(messages: list[Message]) -> list[Message]:
    """The messages without `reasoning_content`: Qwen3 is not shown its past thinking."""
    return [{k: v for k, v in m.items() if k != "reasoning_content"} if "reasoning_content" in m else m
            for m in messages]
