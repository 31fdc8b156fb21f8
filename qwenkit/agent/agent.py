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
loop stops and the last text is the answer (`finish_reason` "tool_calls").
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qwenkit.client.models import ChatModel
from qwenkit.client.tools import Tool, arun_tool_call, as_tools, run_tool_call
from qwenkit.client.types import ChatOptions, Message, ResponseAccumulator, Usage, add_usage

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
    """The final answer; `finish_reason` is "tool_calls" when the rounds ran out."""

    text: str
    finish_reason: str | None = "stop"
    type: ClassVar[str] = "answer"


AgentEvent = ThinkingEvent | ToolCallEvent | ToolResultEvent | AnswerEvent


@dataclass
class AgentResult:
    """What `Agent.run` returns: the answer, the events in order, the messages of the run
    (assistant and tool turns after the task) and the usage summed over rounds."""

    answer: str
    trace: list[AgentEvent]
    messages: list[Message] = field(default_factory=list)
    usage: Usage | None = None
    finish_reason: str | None = "stop"


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
        state = _LoopState(self, task)
        trace = list(self._events(state))
        return state.result(trace)

    def stream(self, task: str | list[Message]) -> Iterator[AgentEvent]:
        """The loop's events as they happen; the last is the `AnswerEvent`."""
        yield from self._events(_LoopState(self, task))

    async def arun(self, task: str | list[Message]) -> AgentResult:
        """`run` for asyncio: the model is awaited, coroutine tools too."""
        state = _LoopState(self, task)
        trace = [event async for event in self._aevents(state)]
        return state.result(trace)

    async def astream(self, task: str | list[Message]) -> AsyncIterator[AgentEvent]:
        """`stream` for asyncio."""
        async for event in self._aevents(_LoopState(self, task)):
            yield event

    def _events(self, state: _LoopState) -> Iterator[AgentEvent]:
        for round in range(self.max_rounds + 1):
            state.begin_round()
            for chunk in self.model.stream(state.messages, self.options, tools=state.schemas):
                yield from state.on_chunk(chunk)
            events, calls = state.end_round(round)
            yield from events
            for call in calls:
                yield ToolCallEvent(call.id, call.name, call.arguments)
                yield state.add_result(call, run_tool_call(state.by_name, call))
            if state.answered:
                return

    async def _aevents(self, state: _LoopState) -> AsyncIterator[AgentEvent]:
        for round in range(self.max_rounds + 1):
            state.begin_round()
            async for chunk in self.model.astream(state.messages, self.options, tools=state.schemas):
                for event in state.on_chunk(chunk):
                    yield event
            events, calls = state.end_round(round)
            for event in events:
                yield event
            for call in calls:
                yield ToolCallEvent(call.id, call.name, call.arguments)
                yield state.add_result(call, await arun_tool_call(state.by_name, call))
            if state.answered:
                return


class _LoopState:
    """The messages, usage and per-round bookkeeping of one agent run, shared by the sync
    and asyncio loops (which differ only in how they stream the model and run tools)."""

    def __init__(self, agent: Agent, task: str | list[Message]):
        self.messages: list[Message] = [{"role": "system", "content": agent.system}] if agent.system else []
        self.messages += [{"role": "user", "content": task}] if isinstance(task, str) else list(task)
        self.start = len(self.messages)
        self.schemas = [t.schema() for t in agent.tools] or None
        self.by_name = {t.name: t for t in agent.tools}
        self.max_rounds = agent.max_rounds
        self.usage: Usage | None = None
        self.answered = False

    def begin_round(self) -> None:
        self.acc = ResponseAccumulator()
        self.thought_given = False

    def on_chunk(self, chunk: Any) -> list[AgentEvent]:
        self.acc.add(chunk)
        # The reasoning is whole once the answer or a tool call begins.
        if not self.thought_given and (chunk.content or chunk.tool_calls) and "".join(self.acc.reasoning):
            self.thought_given = True
            return [ThinkingEvent("".join(self.acc.reasoning))]
        return []

    def end_round(self, round: int) -> tuple[list[AgentEvent], list[Any]]:
        """The round's remaining events and the tool calls to run (none once answered)."""
        response = self.acc.response()
        self.usage = add_usage(self.usage, response.usage)
        events: list[AgentEvent] = []
        if not self.thought_given and response.reasoning_content:
            events.append(ThinkingEvent(response.reasoning_content))
        self.messages.append(response.to_message())
        if not (response.tool_calls and round < self.max_rounds):
            self.answered = True
            events.append(AnswerEvent(response.content or "", response.finish_reason or "stop"))
            return events, []
        if response.content and response.content.strip():
            events.append(ThinkingEvent(response.content))
        return events, response.tool_calls

    def add_result(self, call: Any, result: Message) -> ToolResultEvent:
        self.messages.append(result)
        return ToolResultEvent(call.id, call.name, result["content"], result["content"].startswith("Error:"))

    def result(self, trace: list[AgentEvent]) -> AgentResult:
        answer = trace[-1]
        return AgentResult(answer.text, trace, self.messages[self.start:], self.usage, answer.finish_reason)
