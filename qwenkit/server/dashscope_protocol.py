"""DashScope's text-generation API (``/api/v1/services/aigc/text-generation/generation``) and
multimodal conversation (``.../multimodal-generation/generation``, what the SDK's
`MultiModalConversation.call` posts: content as ``[{"image": URL}, {"text": ...}]``, answered
with content ``[{"text": ...}]``), translated to and from engine calls. Pure functions, no I/O: a request becomes a `GenerationCall` (a typed `ChatRequest`), and
`GenerationAnswer` writes the engine's chunks as events or a whole response.

Request: ``{model, input: {messages | prompt}, parameters: {...}}``. Response:
``{output: {choices: [{finish_reason, message}]} | {text, finish_reason}, usage, request_id}``.
Streaming (header ``X-DashScope-SSE: enable``) sends events of ``id:N``, ``event:result``,
``:HTTP_STATUS/200``, ``data:{...}``; with ``incremental_output`` each event holds only the
new text, otherwise all the text so far. Until the end ``finish_reason`` is the string
``"null"``, as DashScope sends it.

``parameters.logprobs`` / ``top_logprobs`` (result_format ``message`` only) add
``output.choices[i].logprobs = {"content": [{token, logprob, bytes, top_logprobs}]}``, the
shape DashScope documents; in a stream, the new tokens' with ``incremental_output``, else
all so far.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from qwenkit.chat.request import ChatRequest
from qwenkit.chat.types import ChatChunk, ChoiceAccumulator, Usage
from qwenkit.engine.llm_engine import TokenOutput
from qwenkit import sampling_fields as sf
from qwenkit.sampling import SamplingParams
from qwenkit.server.errors import APIError, dashscope_error
from qwenkit.server.openai_protocol import (
    ChatMessage, ResponseFormat, StopString, TokenId, Tool, ToolChoice, chat_logprobs, engine_response_format, engine_tool_choice, normalize_messages,
)


class _Model(BaseModel):
    # extra: the SDK adds fields of its own (user_agent...); strict: as the published schema says.
    model_config = ConfigDict(extra="ignore", strict=True)


class GenerationInput(_Model):
    # One of the two (the schema says so too); messages win when both are given.
    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["messages"]}, {"required": ["prompt"]}]})
    messages: list[ChatMessage] = Field(None, min_length=1)
    prompt: str = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_of(self) -> GenerationInput:
        if self.messages is None and self.prompt is None:
            raise ValueError("input.messages or input.prompt is required")
        return self


# DashScope's sampling fields from the one table (qwenkit/sampling_fields.py), with the
# OpenAI routes' ranges: DashScope documents temperature in [0, 2); 2 itself is taken.
_SamplingFields = create_model("_SamplingFields", __base__=_Model, **sf.pydantic_fields("dashscope"))


class GenerationParameters(_SamplingFields):
    result_format: Literal["text", "message"] = "text"
    incremental_output: bool = False
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # Strings, or token ids given as single-token lists ([[151645]]).
    stop: StopString | list[StopString] | list[Annotated[list[TokenId], Field(min_length=1, max_length=1)]] | None = None
    logprobs: bool | None = None
    stream: bool | None = None


class GenerationRequest(_Model):
    model: str | None = None
    input: GenerationInput
    parameters: GenerationParameters = Field(default_factory=GenerationParameters)


@dataclass(frozen=True)
class GenerationCall:
    """A generation request: the engine's request, and how the answer is written."""

    request: ChatRequest
    result_format: str
    incremental_output: bool


def multimodal_messages(messages: list[ChatMessage]) -> list[ChatMessage]:
    """DashScope's multimodal content parts (``{"image": URL}``, ``{"text": ...}``) as OpenAI's."""
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if "text" in part and isinstance(part["text"], str):
                    parts.append({"type": "text", "text": part["text"]})
                elif "image" in part:
                    parts.append({"type": "image_url", "image_url": {"url": part["image"]}})
                else:
                    kind = next(iter(part), None)
                    raise ValueError(f"input.messages[{i}].content[{j}]: only text and image parts are supported, "
                                     f"got {kind!r}")
            message = message.model_copy(update={"content": parts})
        out.append(message)
    return out


def generation_call(req: GenerationRequest, *, multimodal: bool = False) -> GenerationCall:
    """The engine call a DashScope request asks for (`multimodal`: posted to the multimodal
    conversation route). ValueError (a 400) names a bad field."""
    p = req.parameters
    if req.input.messages:
        messages = normalize_messages(multimodal_messages(req.input.messages) if multimodal else req.input.messages)
    elif req.input.prompt:
        messages = [{"role": "user", "content": req.input.prompt}]
    else:
        raise ValueError("input.messages or input.prompt is required")
    stop, stop_token_ids = p.stop, ()
    if isinstance(stop, list) and stop and isinstance(stop[0], list):  # token-id sequences
        if any(len(s) != 1 for s in stop):
            raise ValueError("parameters.stop: token-id stop sequences must be single tokens")
        stop, stop_token_ids = None, tuple(s[0] for s in stop)
    n = 1 if p.n is None else p.n
    if n > 1 and p.result_format == "text":
        raise ValueError("n > 1 needs result_format 'message'")
    if p.logprobs and p.result_format == "text":
        raise ValueError("logprobs needs result_format 'message'")
    params = SamplingParams(
        temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, presence_penalty=p.presence_penalty,
        repetition_penalty=p.repetition_penalty, seed=p.seed, n=n, max_tokens=p.max_tokens, stop=stop,
        stop_token_ids=stop_token_ids, logprobs=bool(p.logprobs),
        top_logprobs=0 if p.top_logprobs is None else p.top_logprobs,
    )
    request = ChatRequest(
        messages, params,
        enable_thinking=True if p.enable_thinking is None else p.enable_thinking,
        thinking_budget=p.thinking_budget,
        tools=[t.model_dump(exclude_none=True) for t in p.tools] if p.tools else None,
        tool_choice=engine_tool_choice(p.tool_choice),
        parallel_tool_calls=True if p.parallel_tool_calls is None else p.parallel_tool_calls,
        response_format=engine_response_format(p.response_format),
    )
    return GenerationCall(request, p.result_format, p.incremental_output)


def usage_dict(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage with DashScope's names for the prompt and completion counts."""
    d = usage.to_openai()
    return {"input_tokens": d.pop("prompt_tokens"), "output_tokens": d.pop("completion_tokens"),
            "output_tokens_details": d.pop("completion_tokens_details"), **d}


@dataclass
class GenerationEncoder:
    """Engine chunks -> DashScope response dicts: stream events (`encode`) or the whole
    answer (`response`), in the request's result_format. ``decode`` (token id -> text) is
    needed when the request asked for logprobs."""

    request_id: str
    result_format: str = "message"
    incremental_output: bool = False
    content_parts: bool = False  # the multimodal route's content: [{"text": ...}]
    choices: dict[int, ChoiceAccumulator] = field(default_factory=dict)
    usage: Usage | None = None
    decode: Any = None

    def encode(self, chunk: ChatChunk) -> dict[str, Any] | None:
        """Record a chunk; returns its stream event's data (None when it adds nothing)."""
        choice = self.choices.setdefault(chunk.index, ChoiceAccumulator())
        choice.add(chunk)
        d = chunk.delta
        if chunk.usage is not None:
            self.usage = chunk.usage
        if not d and not chunk.logprobs and chunk.finish_reason is None:
            return None
        if self.incremental_output:
            message = self._message(d.reasoning_content, d.content, [
                {"index": t.index, "id": t.id or "", "type": "function",
                 "function": {"name": t.name or "", "arguments": t.arguments}} for t in d.tool_calls
            ])
            logprobs = self._logprobs(chunk.logprobs)
        else:
            message = self._choice_message(choice)
            logprobs = self._logprobs(choice.logprobs)
        return self._body({chunk.index: (message, chunk.finish_reason or "null", logprobs)}, stream=True)

    def response(self) -> dict[str, Any]:
        return self._body({i: (self._choice_message(c), c.finish_reason or "stop", self._logprobs(c.logprobs))
                           for i, c in sorted(self.choices.items())}, stream=False)

    def _logprobs(self, tokens: list[TokenOutput] | None) -> dict[str, Any] | None:
        return None if tokens is None else chat_logprobs(tokens, self.decode)

    def _message(self, reasoning: str, content: str, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": [{"text": content}] if self.content_parts else content,
                                   "reasoning_content": reasoning}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return message

    def _choice_message(self, c: ChoiceAccumulator) -> dict[str, Any]:
        return self._message(*c.texts(),
                             [{"index": i, **call.to_openai()} for i, call in c.tool_calls.indexed()])

    def _body(self, choices: dict[int, tuple[dict[str, Any], str, dict[str, Any] | None]], *,
              stream: bool) -> dict[str, Any]:
        if self.result_format == "text":
            ((message, finish, _),) = choices.values()
            output: dict[str, Any] = {"text": message["content"], "finish_reason": finish}
        else:
            output = {"choices": [
                {"index": i, "finish_reason": finish, "message": message,
                 **({"logprobs": logprobs} if logprobs is not None else {})}
                for i, (message, finish, logprobs) in choices.items()
            ]}
        body: dict[str, Any] = {"output": output, "request_id": self.request_id}
        if self.usage is not None:
            body["usage"] = usage_dict(self.usage)
        elif not stream:
            body["usage"] = usage_dict(Usage(0, 0))
        return body


class GenerationAnswer:
    """A generation written as numbered DashScope events or as one response (see
    `qwenkit.server.respond.Answer`)."""

    def __init__(self, encoder: GenerationEncoder):
        self.encoder = encoder
        self.num_events = 0

    def start(self) -> list[bytes]:
        return []

    def events(self, chunk: ChatChunk) -> list[bytes]:
        out = self.encoder.encode(chunk)
        if out is None:
            return []
        self.num_events += 1
        return [sse_event(self.num_events, out)]

    def fail(self, error: APIError) -> list[bytes]:
        body = dashscope_error(error, self.encoder.request_id)
        return [sse_event(self.num_events + 1, body, status=error.status)]

    async def end(self) -> list[bytes]:
        return []

    def add(self, chunk: ChatChunk) -> None:
        self.encoder.encode(chunk)

    async def whole(self) -> dict[str, Any]:
        return self.encoder.response()


def sse_event(number: int, data: dict[str, Any], *, status: int = 200) -> bytes:
    """One DashScope stream event (``event:error`` for a status other than 200)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    kind = "result" if status == 200 else "error"
    return f"id:{number}\nevent:{kind}\n:HTTP_STATUS/{status}\ndata:{text}\n\n".encode()
