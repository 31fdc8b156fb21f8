"""Chat models: one interface over an OpenAI-compatible endpoint and the in-process engine.

`call` / `stream` and their async twins `acall` / `astream` take OpenAI-style messages,
`ChatOptions` and OpenAI-style tool schemas; they return `ChatResponse` / yield
`ChatResponseChunk`. Nothing here imports torch: `LocalChatModel` imports the engine's
`SamplingParams` on first use.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from qwenkit import sampling_fields
from qwenkit.chat.types import new_tool_call_id
from qwenkit.client.types import (
    ChatOptions, ChatResponse, ChatResponseChunk, Message, ToolCall, ToolCallDelta, Usage,
)

# Options the OpenAI SDK takes as named arguments; the client's other sampling fields go in extra_body.
_OPENAI_ARGS = ("temperature", "top_p", "max_tokens", "seed", "stop", "presence_penalty", "frequency_penalty",
                "response_format", "tool_choice", "parallel_tool_calls")
_EXTRA_ARGS = tuple(name for name in sampling_fields.names_on("client") if name not in _OPENAI_ARGS)


class ChatModel:
    """A chat model. Subclasses implement `call` and `stream`; the async twins default to
    running those on a worker thread."""

    def call(self, messages: list[Message], options: ChatOptions | None = None, *,
             tools: list[dict[str, Any]] | None = None) -> ChatResponse:
        raise NotImplementedError

    def stream(self, messages: list[Message], options: ChatOptions | None = None, *,
               tools: list[dict[str, Any]] | None = None) -> Iterator[ChatResponseChunk]:
        raise NotImplementedError

    async def acall(self, messages: list[Message], options: ChatOptions | None = None, *,
                    tools: list[dict[str, Any]] | None = None) -> ChatResponse:
        return await asyncio.to_thread(self.call, messages, options, tools=tools)

    async def astream(self, messages: list[Message], options: ChatOptions | None = None, *,
                      tools: list[dict[str, Any]] | None = None) -> AsyncIterator[ChatResponseChunk]:
        iterator = self.stream(messages, options, tools=tools)
        done = object()
        try:
            while (chunk := await asyncio.to_thread(next, iterator, done)) is not done:
                yield chunk
        finally:
            iterator.close()


def _usage(raw: Any) -> Usage | None:
    if raw is None:
        return None
    details = getattr(raw, "completion_tokens_details", None)
    cached = getattr(raw, "prompt_tokens_details", None)
    return Usage(raw.prompt_tokens or 0, raw.completion_tokens or 0,
                 reasoning_tokens=(getattr(details, "reasoning_tokens", None) or 0) if details else 0,
                 cached_tokens=(getattr(cached, "cached_tokens", None) or 0) if cached else 0)


def _tool_call(id: str | None, name: str | None, arguments: str | None) -> ToolCall:
    """A whole tool call from either SDK (an endpoint that gives no id gets one)."""
    return ToolCall(id or new_tool_call_id(), name or "", arguments or "")


def _tool_call_delta(index: int | None, id: str | None, name: str | None, arguments: str | None) -> ToolCallDelta:
    """A streamed tool-call piece from either SDK, in one shape: what a piece does not carry
    is None (DashScope sends ``""``, OpenAI-compatible servers None or ``""``), so that
    `ToolCallAccumulator` treats both protocols' streams alike."""
    return ToolCallDelta(index, id or None, name or None, arguments or "")


def _reasoning(obj: Any) -> str | None:
    """Reasoning text from a message or delta: vendors name the extra field
    ``reasoning_content`` (Qwen, DeepSeek) or ``reasoning``."""
    extra = getattr(obj, "model_extra", None) or {}
    return extra.get("reasoning_content") or extra.get("reasoning") or None


class OpenAIChatModel(ChatModel):
    """A chat model behind an OpenAI-compatible endpoint (`qwenkit serve`, vLLM, DashScope's
    compatible mode), through the official `openai` SDK.

    Qwen-specific options (top_k, enable_thinking, thinking_budget, ...) travel in the
    request's extra body, as those servers expect."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, model: str = "default", *,
                 timeout: float | None = 120.0, max_retries: int = 2, **client_kwargs: Any):
        self.base_url, self.api_key, self.model = base_url, api_key, model
        self._client_kwargs = dict(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout,
                                   max_retries=max_retries, **client_kwargs)
        self._sync = None
        self._async = None

    @property
    def client(self):
        if self._sync is None:
            import openai

            self._sync = openai.OpenAI(**self._client_kwargs)
        return self._sync

    @property
    def async_client(self):
        if self._async is None:
            import openai

            self._async = openai.AsyncOpenAI(**self._client_kwargs)
        return self._async

    def _request(self, messages: list[Message], options: ChatOptions | None, tools, stream: bool) -> dict[str, Any]:
        options = options or ChatOptions()
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages}
        for name in _OPENAI_ARGS:
            value = getattr(options, name)
            if value is not None:
                kwargs[name] = value
        if not tools:
            kwargs.pop("tool_choice", None)
            kwargs.pop("parallel_tool_calls", None)
        else:
            kwargs["tools"] = tools
        extra = {name: getattr(options, name) for name in _EXTRA_ARGS if getattr(options, name) is not None}
        extra.update(options.extra_body or {})
        if extra:
            kwargs["extra_body"] = extra
        if stream:
            kwargs["stream"] = True
            kwargs["stream_options"] = {"include_usage": True}
        return kwargs

    def _response(self, raw: Any) -> ChatResponse:
        choice = raw.choices[0]
        message = choice.message
        calls = [_tool_call(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]
        return ChatResponse(content=message.content, reasoning_content=_reasoning(message), tool_calls=calls,
                            finish_reason=choice.finish_reason, usage=_usage(raw.usage), model=raw.model)

    @staticmethod
    def _chunk(raw: Any) -> ChatResponseChunk:
        chunk = ChatResponseChunk(usage=_usage(getattr(raw, "usage", None)))
        if raw.choices:
            choice = raw.choices[0]
            delta = choice.delta
            chunk.content = delta.content or ""
            chunk.reasoning_content = _reasoning(delta) or ""
            chunk.tool_calls = [_tool_call_delta(t.index, t.id, t.function and t.function.name,
                                                 t.function and t.function.arguments)
                                for t in delta.tool_calls or []]
            chunk.finish_reason = choice.finish_reason
        return chunk

    def call(self, messages, options=None, *, tools=None) -> ChatResponse:
        return self._response(self.client.chat.completions.create(**self._request(messages, options, tools, False)))

    def stream(self, messages, options=None, *, tools=None) -> Iterator[ChatResponseChunk]:
        with self.client.chat.completions.create(**self._request(messages, options, tools, True)) as raw:
            for item in raw:
                yield self._chunk(item)

    async def acall(self, messages, options=None, *, tools=None) -> ChatResponse:
        raw = await self.async_client.chat.completions.create(**self._request(messages, options, tools, False))
        return self._response(raw)

    async def astream(self, messages, options=None, *, tools=None) -> AsyncIterator[ChatResponseChunk]:
        raw = await self.async_client.chat.completions.create(**self._request(messages, options, tools, True))
        async with raw:
            async for item in raw:
                yield self._chunk(item)


class LocalChatModel(ChatModel):
    """The in-process engine as a chat model: a `qwenkit.LLM` or a `qwenkit.AsyncLLM`.

    Over an `LLM`, the async twins run the engine on a worker thread (one request at a
    time: an `LLM` is not shared between threads). Over an `AsyncLLM`, they await it, and
    the sync methods run it on a private event loop."""

    def __init__(self, llm: Any):
        self.llm = llm
        self.is_async = hasattr(llm, "generate_stream")  # AsyncLLM

    @staticmethod
    def _arguments(options: ChatOptions | None, tools) -> tuple[Any, dict[str, Any]]:
        from qwenkit.sampling import SamplingParams

        o = options or ChatOptions()
        params = SamplingParams(
            temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, min_p=o.min_p, max_tokens=o.max_tokens,
            seed=o.seed, stop=o.stop, presence_penalty=o.presence_penalty, frequency_penalty=o.frequency_penalty,
            repetition_penalty=o.repetition_penalty,
        )
        kwargs: dict[str, Any] = {"tools": tools or None, "response_format": o.response_format}
        for name in ("enable_thinking", "thinking_budget", "tool_choice", "parallel_tool_calls"):
            if getattr(o, name) is not None:
                kwargs[name] = getattr(o, name)
        kwargs.update(o.extra_body or {})
        return params, kwargs

    @staticmethod
    def _messages(messages: list[Message]) -> list[Message]:
        # The template takes "" where OpenAI allows a null content beside tool calls.
        return [{**m, "content": m.get("content") or ""} for m in messages]

    @staticmethod
    def _response(out: Any) -> ChatResponse:
        return ChatResponse(content=out.content, reasoning_content=out.reasoning_content,
                            tool_calls=list(out.tool_calls), finish_reason=out.finish_reason, usage=out.usage)

    @staticmethod
    def _chunk(c: Any) -> ChatResponseChunk:
        return ChatResponseChunk(content=c.delta.content, reasoning_content=c.delta.reasoning_content,
                                 tool_calls=list(c.delta.tool_calls), finish_reason=c.finish_reason, usage=c.usage)

    def call(self, messages, options=None, *, tools=None) -> ChatResponse:
        if self.is_async:
            return _run_sync(self.acall(messages, options, tools=tools))
        params, kwargs = self._arguments(options, tools)
        return self._response(self.llm.chat(self._messages(messages), params, **kwargs))

    def stream(self, messages, options=None, *, tools=None) -> Iterator[ChatResponseChunk]:
        if self.is_async:
            yield from _iterate_sync(self.astream(messages, options, tools=tools))
            return
        params, kwargs = self._arguments(options, tools)
        for c in self.llm.chat_stream(self._messages(messages), params, **kwargs):
            if c.index == 0:
                yield self._chunk(c)

    async def acall(self, messages, options=None, *, tools=None) -> ChatResponse:
        if not self.is_async:
            return await super().acall(messages, options, tools=tools)
        params, kwargs = self._arguments(options, tools)
        return self._response(await self.llm.chat(self._messages(messages), params, **kwargs))

    async def astream(self, messages, options=None, *, tools=None) -> AsyncIterator[ChatResponseChunk]:
        if not self.is_async:
            async for chunk in super().astream(messages, options, tools=tools):
                yield chunk
            return
        params, kwargs = self._arguments(options, tools)
        async for c in self.llm.chat_stream(self._messages(messages), params, **kwargs):
            if c.index == 0:
                yield self._chunk(c)


def _run_sync(coroutine):
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    raise RuntimeError("a sync call on an AsyncLLM from inside an event loop: use acall / astream")


def _iterate_sync(aiterator) -> Iterator[Any]:
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(aiterator.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(aiterator.aclose())
        loop.close()


# Options DashScope's text-generation API takes as parameters: the sampling fields it
# shares with the client (min_p and frequency_penalty it does not know; set them in
# extra_body if an endpoint does), stop and response_format.
_DASHSCOPE_ARGS = (*(name for name in sampling_fields.names_on("client")
                     if name in sampling_fields.names_on("dashscope")), "stop", "response_format")


class DashScopeError(RuntimeError):
    """A DashScope endpoint answered with an error status (the SDK returns these, it does not raise)."""

    def __init__(self, status_code: int, code: str | None, message: str | None):
        super().__init__(f"DashScope error {status_code} {code or ''}: {message or ''}".strip())
        self.status_code, self.code, self.message = status_code, code, message


class DashScopeChatModel(ChatModel):
    """A chat model behind DashScope's text-generation API (Alibaba Cloud, or `qwenkit serve`
    at ``/api/v1``), through the official `dashscope` SDK.

    `base_url` is the API root, e.g. ``http://127.0.0.1:8000/api/v1``; it travels with each
    request (the SDK's `base_address`), so the SDK's module-level settings are left alone.
    Streams ask for incremental output. The async twins run the sync calls on a worker thread."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, model: str = "qwen-plus",
                 **call_kwargs: Any):
        self.base_url, self.api_key, self.model = base_url, api_key, model
        self._call_kwargs = call_kwargs  # more SDK arguments for every call (headers, workspace, ...)

    def _request(self, messages: list[Message], options: ChatOptions | None, tools, stream: bool) -> dict[str, Any]:
        options = options or ChatOptions()
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "result_format": "message",
                                  "api_key": self.api_key or "EMPTY", **self._call_kwargs}
        if self.base_url:
            kwargs["base_address"] = self.base_url
        for name in _DASHSCOPE_ARGS:
            if getattr(options, name) is not None:
                kwargs[name] = getattr(options, name)
        if tools:
            kwargs["tools"] = tools
            for name in ("tool_choice", "parallel_tool_calls"):
                if getattr(options, name) is not None:
                    kwargs[name] = getattr(options, name)
        kwargs.update(options.extra_body or {})
        if stream:
            kwargs["stream"] = True
            kwargs["incremental_output"] = True
        return kwargs

    @staticmethod
    def _check(raw: Any) -> None:
        if raw.status_code != 200:
            raise DashScopeError(raw.status_code, getattr(raw, "code", None), getattr(raw, "message", None))

    @staticmethod
    def _usage(raw: Any) -> Usage | None:
        usage = getattr(raw, "usage", None)
        if not usage:
            return None
        output_details = usage.get("output_tokens_details") or {}
        prompt_details = usage.get("prompt_tokens_details") or {}
        return Usage(usage.get("input_tokens") or 0, usage.get("output_tokens") or 0,
                     reasoning_tokens=output_details.get("reasoning_tokens") or 0,
                     cached_tokens=prompt_details.get("cached_tokens") or 0)

    @staticmethod
    def _finish_reason(choice: Any) -> str | None:
        reason = choice.get("finish_reason")
        return None if reason in (None, "", "null") else reason  # DashScope streams "null" until the end

    def _response(self, raw: Any) -> ChatResponse:
        self._check(raw)
        choice = raw.output.choices[0]
        message = choice["message"]
        calls = [_tool_call(c.get("id"), (c.get("function") or {}).get("name"),
                            (c.get("function") or {}).get("arguments"))
                 for c in message.get("tool_calls") or []]
        return ChatResponse(content=message.get("content") or None,
                            reasoning_content=message.get("reasoning_content") or None, tool_calls=calls,
                            finish_reason=self._finish_reason(choice) or "stop", usage=self._usage(raw),
                            model=self.model)

    def _chunk(self, raw: Any) -> ChatResponseChunk:
        self._check(raw)
        choice = raw.output.choices[0]
        message = choice.get("message") or {}
        finish_reason = self._finish_reason(choice)
        return ChatResponseChunk(
            content=message.get("content") or "", reasoning_content=message.get("reasoning_content") or "",
            tool_calls=[_tool_call_delta(c.get("index"), c.get("id"), (c.get("function") or {}).get("name"),
                                         (c.get("function") or {}).get("arguments"))
                        for c in message.get("tool_calls") or []],
            finish_reason=finish_reason, usage=self._usage(raw) if finish_reason else None)

    def call(self, messages, options=None, *, tools=None) -> ChatResponse:
        from dashscope import Generation

        return self._response(Generation.call(**self._request(messages, options, tools, False)))

    def stream(self, messages, options=None, *, tools=None) -> Iterator[ChatResponseChunk]:
        from dashscope import Generation

        for raw in Generation.call(**self._request(messages, options, tools, True)):
            yield self._chunk(raw)
