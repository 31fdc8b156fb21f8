"""qwenkit.agent: a tool-using agent loop over any `qwenkit.client` chat model. No torch."""

from qwenkit.agent.agent import (
    Agent, AgentEvent, AgentResult, AnswerEvent, ThinkingEvent, ToolCallEvent, ToolResultEvent,
)

__all__ = ["Agent", "AgentEvent", "AgentResult", "AnswerEvent", "ThinkingEvent", "ToolCallEvent", "ToolResultEvent"]
