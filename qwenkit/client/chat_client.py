"""ChatClient: defaults given once, then a fluent request per turn.

    client = ChatClient(model, default_system="Be brief.", default_advisors=[...], default_tools=[get_weather])
    client.prompt("Weather in Paris?").call().content()
    client.prompt().system("...").user("...").options(temperature=0).call().entity(Weather)
    for text in client.prompt("Hi").stream().content(): ...
    await client.prompt("Hi").acall() / client.prompt("Hi").astream().content()

The model call at the centre of the advisor chain runs the tool loop: call the model,
run the tools it asks for (several per round; an exception is the tool's result), call
it again with the results, up to `max_tool_rounds` rounds. The loop's rules (a repeated
call ends it with one more call without tools; see `qwenkit.client.tool_loop`) are one
state machine, `ToolLoop`; the four ways to run a request are thin shells around it, and
`ChatResponse.tool_loop` says how the loop ended.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter

from qwenkit.client.advisors import AdvisedRequest, Advisor
from qwenkit.client.models import ChatModel
from qwenkit.client.tool_loop import CallModel, Finish, ToolLoop
from qwenkit.client.tools import arun_tool_call, as_tools, run_tool_call
from qwenkit.client.types import ChatOptions, ChatResponse, ChatResponseChunk, Media, Message

__all__ = ["CallResponse", "ChatClient", "PromptRequest", "StreamResponse"]

T = TypeVar("T")


class ChatClient:
    """A chat model with defaults: system text, options, advisors, tools."""

    def __init__(self, model: ChatModel, *, default_system: str | None = None,
                 default_options: ChatOptions | dict[str, Any] | None = None,
                 default_advisors: list[Advisor] | None = None, default_tools: list[Any] | None = None,
                 max_tool_rounds: int = 8):
        self.model = model
        self.default_system = default_system
        self.default_options = ChatOptions().merged(default_options)
        self.default_advisors = list(default_advisors or [])
        self.default_tools = as_tools(default_tools or [])
        self.max_tool_rounds = max_tool_rounds

    def prompt(self, user: str | None = None) -> PromptRequest:
        """A new request; `user` is the user's text (or add it with `.user(...)`)."""
        request = PromptRequest(self)
        return request.user(user) if user is not None else request


class PromptRequest:
    """A fluent request: set its parts, then `.call()` / `.stream()` / `.acall()` / `.astream()`."""

    def __init__(self, client: ChatClient):
        self.client = client
        self._system = client.default_system
        self._messages: list[Message] = []
        self._options = client.default_options
        self._advisors = list(client.default_advisors)
        self._tools = list(client.default_tools)
        self._context: dict[str, Any] = {}

    def system(self, text: str) -> PromptRequest:
        self._system = text
        return self

    def user(self, text: str, media: list[Media] | None = None) -> PromptRequest:
        """The user's text, and any images with it (`Media`; a vision-language model reads them)."""
        if media:
            parts = [m.to_part() for m in media] + [{"type": "text", "text": text}]
            self._messages.append({"role": "user", "content": parts})
        else:
            self._messages.append({"role": "user", "content": text})
        return self

    def messages(self, messages: list[Message]) -> PromptRequest:
        """Add raw OpenAI-style messages to this turn."""
        self._messages.extend(messages)
        return self

    def options(self, options: ChatOptions | dict[str, Any] | None = None, **fields: Any) -> PromptRequest:
        """Options laid over the client's defaults, as an object or keyword fields."""
        self._options = self._options.merged(options).merged(fields or None)
        return self

    def advisors(self, *advisors: Advisor, **context: Any) -> PromptRequest:
        """More advisors for this request, and context entries (e.g. conversation_id="42")."""
        self._advisors.extend(advisors)
        self._context.update(context)
        return self

    def tools(self, *tools: Any) -> PromptRequest:
        self._tools.extend(as_tools(list(tools)))
        return self

    def _request(self) -> AdvisedRequest:
        if not self._messages:
            raise ValueError("the request has no user message: use prompt(text) or .user(text)")
        return AdvisedRequest(messages=list(self._messages), system=self._system, options=self._options,
                              tools=list(self._tools), context=dict(self._context))

    def _chain(self) -> list[Advisor]:
        return sorted(self._advisors, key=lambda a: a.order)  # stable: equal orders keep their places

    def call(self) -> CallResponse:
        """The answer, computed on first use of `content()`, `chat_response()` or `entity()`."""
        return CallResponse(self)

    def stream(self) -> StreamResponse:
        return StreamResponse(_Run(self.client, self._request(), self._chain()))

    async def acall(self) -> CallResponse:
        return CallResponse(self, await _Run(self.client, self._request(), self._chain()).acall())

    async def aentity(self, entity: type[T]) -> T:
        """`call().entity(entity)` for asyncio."""
        self.options(response_format=response_format_for(entity))
        return parse_entity(entity, (await self.acall()).content())

    def astream(self) -> AsyncStreamResponse:
        return AsyncStreamResponse(_Run(self.client, self._request(), self._chain()))


class _Run:
    """One request through the chain: before hooks, the model with its tool loop, after hooks."""

    def __init__(self, client: ChatClient, request: AdvisedRequest, chain: list[Advisor]):
        self.client, self.request, self.chain = client, request, chain
        self.entered: list[Advisor] = []
        self.response: ChatResponse | None = None

    def before(self) -> AdvisedRequest:
        for advisor in self.chain:
            self.request = advisor.before(self.request)
            self.entered.append(advisor)
            if self.request.response is not None:
                break
        return self.request

    def after(self, response: ChatResponse) -> ChatResponse:
        for advisor in reversed(self.entered):
            response = advisor.after(self.request, response)
        self.response = response
        return response

    def adapt(self, chunk: ChatResponseChunk) -> ChatResponseChunk:
        for advisor in reversed(self.entered):
            chunk = advisor.adapt_chunk(self.request, chunk)
        return chunk

    def start(self) -> tuple[ToolLoop | None, CallModel | Finish]:
        """The before hooks, then the ToolLoop and its first action; (None, Finish) when an
        advisor answered."""
        request = self.before()
        if request.response is not None:
            return None, Finish(request.response)
        loop = ToolLoop(request.prompt_messages(), request.options, request.tools,
                        max_rounds=self.client.max_tool_rounds)
        return loop, loop.start()

    # The four shells below do the I/O the ToolLoop asks for, and nothing else.

    def call(self) -> ChatResponse:
        loop, action = self.start()
        while not isinstance(action, Finish):
            if isinstance(action, CallModel):
                action = loop.receive_response(
                    self.client.model.call(action.messages, action.options, tools=action.tools))
            else:
                action = loop.receive_results([run_tool_call(loop.tools, call) for call in action.calls])
        return self.after(action.response)

    async def acall(self) -> ChatResponse:
        loop, action = self.start()
        while not isinstance(action, Finish):
            if isinstance(action, CallModel):
                action = loop.receive_response(
                    await self.client.model.acall(action.messages, action.options, tools=action.tools))
            else:
                action = loop.receive_results([await arun_tool_call(loop.tools, call) for call in action.calls])
        return self.after(action.response)

    def stream(self) -> Iterator[ChatResponseChunk]:
        loop, action = self.start()
        while not isinstance(action, Finish):
            if isinstance(action, CallModel):
                for chunk in self.client.model.stream(action.messages, action.options, tools=action.tools):
                    yield from map(self.adapt, loop.receive_chunk(chunk))
                held, action = loop.end_stream()
                yield from map(self.adapt, held)
            else:
                action = loop.receive_results([run_tool_call(loop.tools, call) for call in action.calls])
        response = self.after(action.response)
        if loop is None:  # an advisor answered: its answer as one chunk
            yield ChatResponseChunk(content=response.content or "", finish_reason=response.finish_reason)

    async def astream(self) -> AsyncIterator[ChatResponseChunk]:
        loop, action = self.start()
        while not isinstance(action, Finish):
            if isinstance(action, CallModel):
                async for chunk in self.client.model.astream(action.messages, action.options, tools=action.tools):
                    for out in loop.receive_chunk(chunk):
                        yield self.adapt(out)
                held, action = loop.end_stream()
                for out in held:
                    yield self.adapt(out)
            else:
                action = loop.receive_results([await arun_tool_call(loop.tools, call) for call in action.calls])
        response = self.after(action.response)
        if loop is None:
            yield ChatResponseChunk(content=response.content or "", finish_reason=response.finish_reason)


def response_format_for(entity: Any) -> dict[str, Any]:
    """OpenAI's json_schema response_format for a pydantic model (or any type pydantic knows)."""
    schema = TypeAdapter(entity).json_schema()
    name = re.sub(r"[^a-zA-Z0-9_-]", "_", getattr(entity, "__name__", "entity"))[:64]
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def parse_entity(entity: type[T], text: str | None) -> T:
    """Validate the answer's JSON as `entity` (a ```json fence around it is tolerated)."""
    text = (text or "").strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.S)
    if fence:
        text = fence.group(1)
    if isinstance(entity, type) and issubclass(entity, BaseModel):
        return entity.model_validate_json(text)
    return TypeAdapter(entity).validate_python(json.loads(text))


class CallResponse:
    """The answer of `.call()`. The model runs on the first accessor, once: `entity()`
    first asks for JSON of the entity's schema through response_format."""

    def __init__(self, prompt: PromptRequest, response: ChatResponse | None = None):
        self._prompt = prompt
        self._response = response

    def chat_response(self) -> ChatResponse:
        """The answer with reasoning, tool calls, finish reason and usage (summed over tool rounds)."""
        if self._response is None:
            p = self._prompt
            self._response = _Run(p.client, p._request(), p._chain()).call()
        return self._response

    def content(self) -> str | None:
        return self.chat_response().content

    def entity(self, entity: type[T]) -> T:
        """The answer as `entity` (a pydantic model, or any type pydantic validates)."""
        if self._response is None:
            self._prompt.options(response_format=response_format_for(entity))
        return parse_entity(entity, self.content())


class StreamResponse:
    """A streamed answer; iterate one of `content()` or `chunks()`, once."""

    def __init__(self, run: _Run):
        self._run = run

    def chunks(self) -> Iterator[ChatResponseChunk]:
        return self._run.stream()

    def content(self) -> Iterator[str]:
        """The answer's text as it comes (reasoning left out unless an advisor folds it in)."""
        return (c.content for c in self._run.stream() if c.content)

    def chat_response(self) -> ChatResponse | None:
        """The whole answer after the advisors' `after` hooks, once the stream is consumed."""
        return self._run.response


class AsyncStreamResponse:
    """`StreamResponse` for asyncio."""

    def __init__(self, run: _Run):
        self._run = run

    def chunks(self) -> AsyncIterator[ChatResponseChunk]:
        return self._run.astream()

    async def content(self) -> AsyncIterator[str]:
        async for chunk in self._run.astream():
            if chunk.content:
                yield chunk.content

    def chat_response(self) -> ChatResponse | None:
        return self._run.response
