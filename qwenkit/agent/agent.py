"""An agent loop over a chat model: think, call a tool, think again, call another, answer.

    agent = Agent(model, tools=[get_weather, convert], system="You are helpful.")
    result = agent.run("Weather in Paris, in Fahrenheit?")
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

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qwenkit.client.models import ChatModel
from qwenkit.client.tools import Tool, as_tools, run_tool_call
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
        trace: list[AgentEvent] = []
        stream = self._loop(task)
        while True:
            try:
                trace.append(next(stream))
            except StopIteration as stop:
                messages, usage = stop.value
                break
        answer = trace[-1]
        return AgentResult(answer.text, trace, messages, usage, answer.finish_reason)

    def stream(self, task: str | list[Message]) -> Iterator[AgentEvent]:
        """The loop's events as they happen; the last is the `AnswerEvent`."""
        yield from self._loop(task)

    def _loop(self, task: str | list[Message]):
        messages: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        messages += [{"role": "user", "content": task}] if isinstance(task, str) else list(task)
        start = len(messages)
        schemas = [t.schema() for t in self.tools] or None
        by_name = {t.name: t for t in self.tools}
        usage = None
        for round in range(self.max_rounds + 1):
            acc = ResponseAccumulator()
            thought_given = False
            for chunk in self.model.stream(messages, self.options, tools=schemas):
                acc.add(chunk)
                # The reasoning is whole once the answer or a tool call begins.
                if not thought_given and (chunk.content or chunk.tool_calls) and "".join(acc.reasoning):
                    thought_given = True
                    yield ThinkingEvent("".join(acc.reasoning))
            response = acc.response()
            usage = add_usage(usage, response.usage)
            if not thought_given and response.reasoning_content:
                yield ThinkingEvent(response.reasoning_content)
            if not (response.tool_calls and round < self.max_rounds):
                yield AnswerEvent(response.content or "", response.finish_reason or "stop")
                messages.append(response.to_message())
                return messages[start:], usage
            if response.content and response.content.strip():
                yield ThinkingEvent(response.content)
            messages.append(response.to_message())
            for call in response.tool_calls:
                yield ToolCallEvent(call.id, call.name, call.arguments)
                result = run_tool_call(by_name, call)
                messages.append(result)
                yield ToolResultEvent(call.id, call.name, result["content"], result["content"].startswith("Error:"))
