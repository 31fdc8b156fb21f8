"""An agent loop over a chat model: think, call a tool, think again, call another, answer.

    agent = Agent(model, tools=[get_weather, convert], system="You are helpful.")
    result = agent.run("Weather in Paris, in Fahrenheit?")   # or: await agent.arun(...)
    result.answer, result.trace       # the final text; the events that led to it
    for event in agent.stream(task):  # the same events as they happen
        ...

Each round the model is streamed once; its reasoning (and any text it writes beside its
tool calls) becomes a `ThinkingEvent`, each tool call a `ToolCallEvent` followed by the
`ToolResultEvent` of its execution (an exception is the result, for the model to read);
a round without tool calls is the `AnswerEvent`. Past `max_rounds` rounds of tools the
loop stops and the last text is the answer (`finish_reason` "tool_calls"). The rounds are
run by the client's `ToolLoop` (`qwenkit.client.tool_loop`), as `ChatClient` runs them: a
model that asks again only for calls already answered is asked once more without tools,
and the `AnswerEvent` / `AgentResult` carry the loop's `ToolLoopOutcome`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qwenkit.client.models import ChatModel
from qwenkit.client.tool_loop import CallModel, Finish, RunTools, ToolLoop
from qwenkit.client.tools import Tool, arun_tool_call, as_tools, run_tool_call
from qwenkit.client.types import ChatOptions, ChatResponse, Message, ToolLoopOutcome, Usage

__all__ = ["Agent", "AgentEvent", "AgentResult", "AnswerEvent", "ThinkingEvent", "ToolCallEvent",
           "ToolResultEvent"]


@dataclass(frozen=True)
class ThinkingEvent:
    """The model's reasoning in one round (or text it wrote before calling tools)."""

    text: str
    type: ClassVar[str] = "thinking"


@dataclass(frozen=True)
class ToolCallEvent:
    """The model asks for a tool; `arguments` is its JSON text."""

    id: str
    name: str
    arguments: str
    type: ClassVar[str] = "tool_call"


@dataclass(frozen=True)
class ToolResultEvent:
    """A tool's result text; `is_error` when it failed (the text then starts ``Error:``)."""

    id: str
    name: str
    content: str
    is_error: bool = False
    type: ClassVar[str] = "tool_result"


@dataclass(frozen=True)
class AnswerEvent:
    """The final answer; `finish_reason` is "tool_calls" when the rounds ran out.
    `outcome` says how the tool loop ended (None when the agent has no tools)."""

    text: str
    finish_reason: str | None = "stop"
    outcome: ToolLoopOutcome | None = None
    type: ClassVar[str] = "answer"


AgentEvent = ThinkingEvent | ToolCallEvent | ToolResultEvent | AnswerEvent


@dataclass
class AgentResult:
    """What `Agent.run` returns: the answer, the events in order, the messages of the run
    (assistant and tool turns after the task), the usage summed over rounds and how the
    tool loop ended (`ToolLoopOutcome`: answered, repeated_call or max_rounds)."""

    answer: str
    trace: list[AgentEvent]
    messages: list[Message] = field(default_factory=list)
    usage: Usage | None = None
    finish_reason: str | None = "stop"
    outcome: ToolLoopOutcome | None = None


class Agent:
    """A model with tools and a system text, run on a task until it answers.

    `model` is a `ChatModel` (or a `ChatClient`, whose model is used); `tools` are `Tool`s
    or plain typed functions; `options` apply to every round; `max_rounds` bounds the
    rounds of tool calls. `mcp_servers`: an `{"mcpServers": {...}}` config (dict or path,
    as Claude Desktop and Qwen-Agent write it) whose servers' tools join `tools`; they
    are connected here and closed by `close()` (or leaving `with Agent(...)`)."""

    def __init__(self, model: Any, *, tools: list[Any] | None = None, system: str | None = None,
                 options: ChatOptions | dict[str, Any] | None = None, max_rounds: int = 8,
                 mcp_servers: Any = None):
        self.model: ChatModel = getattr(model, "model", model) if not isinstance(model, ChatModel) else model
        self.tools: list[Tool] = as_tools(tools or [])
        self.mcp = None
        if mcp_servers is not None:
            from qwenkit.client.mcp import MCPToolset

            self.mcp = MCPToolset(mcp_servers).start()
            self.tools += self.mcp.tools
        self.system = system
        self.options = ChatOptions().merged(options)
        self.max_rounds = max_rounds

    def close(self) -> None:
        """Disconnect the MCP servers (stdio ones are stopped)."""
        if self.mcp is not None:
            self.mcp.close()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, task: str | list[Message]) -> AgentResult:
        """Run the loop to the end; the answer with its trace."""
        loop = self._loop(task)
        return _result(loop, list(self._events(loop)))

    def stream(self, task: str | list[Message]) -> Iterator[AgentEvent]:
        """The loop's events as they happen; the last is the `AnswerEvent`."""
        yield from self._events(self._loop(task))

    async def arun(self, task: str | list[Message]) -> AgentResult:
        """`run` for asyncio: the model is awaited, coroutine tools too."""
        loop = self._loop(task)
        return _result(loop, [event async for event in self._aevents(loop)])

    async def astream(self, task: str | list[Message]) -> AsyncIterator[AgentEvent]:
        """`stream` for asyncio."""
        async for event in self._aevents(self._loop(task)):
            yield event

    def _loop(self, task: str | list[Message]) -> ToolLoop:
        prompt: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        prompt += [{"role": "user", "content": task}] if isinstance(task, str) else list(task)
        return ToolLoop(prompt, self.options, self.tools, max_rounds=self.max_rounds)

    # The two shells below do the I/O the ToolLoop asks for and turn it into events.

    def _events(self, loop: ToolLoop) -> Iterator[AgentEvent]:
        action = loop.start()
        while not isinstance(action, Finish):
            if isinstance(action, CallModel):
                thinking = _Round()
                for chunk in self.model.stream(action.messages, action.options, tools=action.tools):
                    yield from thinking.on_chunks(loop.receive_chunk(chunk))
                held, action = loop.end_stream()
                yield from thinking.on_chunks(held)
                yield from thinking.end(action)
            else:
                results = []
                for call in action.calls:
                    yield ToolCallEvent(call.id, call.name, call.arguments)
                    results.append(run_tool_call(loop.tools, call))
                    yield _result_event(call, results[-1])
                action = loop.receive_results(results)
                yield from _reused_events(loop)
        yield _answer_event(action.response)

    async def _aevents(self, loop: ToolLoop) -> AsyncIterator[AgentEvent]:
        action = loop.start()
        while not isinstance(action, Finish):
            if isinstance(action, CallModel):
                thinking = _Round()
                async for chunk in self.model.astream(action.messages, action.options, tools=action.tools):
                    for event in thinking.on_chunks(loop.receive_chunk(chunk)):
                        yield event
                held, action = loop.end_stream()
                for event in thinking.on_chunks(held) + thinking.end(action):
                    yield event
            else:
                results = []
                for call in action.calls:
                    yield ToolCallEvent(call.id, call.name, call.arguments)
                    results.append(await arun_tool_call(loop.tools, call))
                    yield _result_event(call, results[-1])
                action = loop.receive_results(results)
                for event in _reused_events(loop):
                    yield event
        yield _answer_event(action.response)


class _Round:
    """The thinking events of one streamed model call: its reasoning, given whole once the
    answer or a tool call begins (or at the end), and text written beside tool calls."""

    def __init__(self) -> None:
        self.reasoning: list[str] = []
        self.thought_given = False

    def on_chunks(self, chunks: list[Any]) -> list[AgentEvent]:
        events: list[AgentEvent] = []
        for chunk in chunks:
            self.reasoning.append(chunk.reasoning_content)
            if not self.thought_given and (chunk.content or chunk.tool_calls) and "".join(self.reasoning):
                self.thought_given = True
                events.append(ThinkingEvent("".join(self.reasoning)))
        return events

    def end(self, action: Any) -> list[AgentEvent]:
        events: list[AgentEvent] = []
        if not self.thought_given and "".join(self.reasoning):
            events.append(ThinkingEvent("".join(self.reasoning)))
        asked = action.response if isinstance(action, RunTools) else None
        if asked is not None and asked.content and asked.content.strip():
            events.append(ThinkingEvent(asked.content))
        return events


def _result_event(call: Any, result: Message) -> ToolResultEvent:
    return ToolResultEvent(call.id, call.name, result["content"], result["content"].startswith("Error:"))


def _reused_events(loop: ToolLoop) -> Iterator[AgentEvent]:
    """A call the model asked for again beside new ones: answered with its earlier result."""
    for call, result in loop.reused:
        yield ToolCallEvent(call.id, call.name, call.arguments)
        yield _result_event(call, result)


def _answer_event(response: ChatResponse) -> AnswerEvent:
    return AnswerEvent(response.content or "", response.finish_reason or "stop", response.tool_loop)


def _result(loop: ToolLoop, trace: list[AgentEvent]) -> AgentResult:
    answer = trace[-1]
    return AgentResult(answer.text, trace, loop.turn, loop.usage, answer.finish_reason, answer.outcome)
