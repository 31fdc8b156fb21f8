"""The client's value types: options, responses, stream chunks. No torch.

Messages are OpenAI-style dicts (``{"role": ..., "content": ...}``); an assistant turn
may carry ``reasoning_content`` and ``tool_calls`` in OpenAI's nested shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model

from qwenkit import sampling_fields
from qwenkit.chat.types import ToolCall, ToolCallAccumulator, ToolCallDelta, Usage

__all__ = ["ChatOptions", "ChatResponse", "Media", "ChatResponseChunk", "ToolCall", "ToolCallDelta", "ToolLoopEnd",
           "ToolLoopOutcome", "Usage", "ResponseAccumulator", "ToolCallAccumulator", "add_usage", "strip_reasoning"]

Message = dict[str, Any]


@dataclass(frozen=True)
class Media:
    """An image for a vision-language model, as Spring AI's `Media`: `mime_type` and the data (the
    file's bytes, or a `data:` / http(s) URL as a string). `Media.from_file("photo.png")` reads one."""

    mime_type: str
    data: bytes | str

    @classmethod
    def from_file(cls, path: str | Any, mime_type: str | None = None) -> "Media":
        import mimetypes
        from pathlib import Path

        path = Path(path)
        mime_type = mime_type or mimetypes.guess_type(path.name)[0]
        if not mime_type or not mime_type.startswith("image/"):
            raise ValueError(f"{path}: not an image file (its type is {mime_type or 'unknown'}); pass mime_type")
        return cls(mime_type, path.read_bytes())

    def to_part(self) -> dict[str, Any]:
        """The OpenAI chat content part: `{"type": "image_url", "image_url": {"url": ...}}`."""
        if isinstance(self.data, str):
            url = self.data
        else:
            import base64

            url = f"data:{self.mime_type};base64,{base64.b64encode(self.data).decode()}"
        return {"type": "image_url", "image_url": {"url": url}}


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The sampling options from the one table (qwenkit/sampling_fields.py): a value out of its
# range fails here, where it is set, with the range the server would name.
_SamplingOptions = create_model("_SamplingOptions", __base__=_Options, **sampling_fields.pydantic_fields("client"))


class ChatOptions(_SamplingOptions):
    """How the model should answer. A field left None is not sent (the model's default applies).
    The sampling fields (temperature ... thinking_budget) are qwenkit.sampling_fields' rows.

    `merged(other)` lays the fields `other` sets over these: client defaults, then the
    request's options. `extra_body` carries anything else an endpoint takes."""

    stop: list[str] | None = None
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


class ToolLoopEnd(str, Enum):
    """Why a tool loop ended (a `str`, so `outcome.reason == "repeated_call"` reads)."""

    ANSWERED = "answered"  # the model answered without asking for a tool
    REPEATED_CALL = "repeated_call"  # it asked only for calls already answered; then it was asked, without tools
    MAX_ROUNDS = "max_rounds"  # it still asked for tools after the last round; those calls were not run


@dataclass(frozen=True)
class ToolLoopOutcome:
    """How a turn with tools ended.

    `rounds` counts the rounds of tools run; `tool_results` are the tool messages of the
    turn in order; `repeated_calls` the calls whose repetition ended the loop. A last
    answer that only echoed a tool call (``{"name": "get_weather", ...}`` as text, as small
    models write when asked without tools) is not given as the content: it is kept here
    as `withheld_content`, and the content is None."""

    reason: ToolLoopEnd
    rounds: int = 0
    tool_results: tuple[Message, ...] = ()
    repeated_calls: tuple[ToolCall, ...] = ()
    withheld_content: str | None = None


@dataclass
class ChatResponse:
    """One answer of a chat model, or the last answer of a tool loop.

    `messages` holds the turn's assistant and tool messages in order (the tool-call
    rounds, then the final answer), as chat memory stores them; `usage` is summed over
    the rounds; `tool_loop` says how a turn that offered tools ended (None when it offered
    none). `metadata` is free for advisors."""

    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = "stop"
    usage: Usage | None = None
    model: str | None = None
    messages: list[Message] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    tool_loop: ToolLoopOutcome | None = None

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
        self.tool_calls = ToolCallAccumulator()
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def add(self, chunk: ChatResponseChunk) -> None:
        self.content.append(chunk.content)
        self.reasoning.append(chunk.reasoning_content)
        for delta in chunk.tool_calls:
            self.tool_calls.add(delta)
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.usage = chunk.usage or self.usage

    def response(self) -> ChatResponse:
        return ChatResponse(content="".join(self.content) or None, reasoning_content="".join(self.reasoning) or None,
                            tool_calls=self.tool_calls.calls(), finish_reason=self.finish_reason, usage=self.usage)


def strip_reasoning(messages: list[Message]) -> list[Message]:
    """The messages without `reasoning_content`: Qwen3 is not shown its past thinking."""
    return [{k: v for k, v in m.items() if k != "reasoning_content"} if "reasoning_content" in m else m
            for m in messages]
