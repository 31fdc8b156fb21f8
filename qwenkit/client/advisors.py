"""Advisors: an ordered chain of hooks around each model call and stream.

For a request, `before` runs in ascending `order` (an advisor may change the request,
or answer it itself by setting `request.response`); the model runs (with its tool
loop); then `after` runs in descending order. In a stream each chunk passes through
`adapt_chunk` in descending order, and `after` sees the whole answer when the stream
ends. `request.context` is a per-request dict shared by the chain (e.g. the
conversation id). Subclass `Advisor` for your own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from qwenkit.client.memory import ChatMemory
from qwenkit.client.types import ChatOptions, ChatResponse, ChatResponseChunk, Message, strip_reasoning

__all__ = ["AdvisedRequest", "Advisor", "MessageChatMemoryAdvisor", "PromptChatMemoryAdvisor",
           "ReasoningContentAdvisor", "SafeGuardAdvisor", "SimpleLoggerAdvisor", "CONVERSATION_ID"]

CONVERSATION_ID = "conversation_id"
logger = logging.getLogger("qwenkit.client")


@dataclass
class AdvisedRequest:
    """One request on its way through the chain.

    `messages` are this turn's new messages (the user's); `history` the earlier turns a
    memory advisor put in; the model sees system + history + messages."""

    messages: list[Message]
    system: str | None = None
    history: list[Message] = field(default_factory=list)
    options: ChatOptions = field(default_factory=ChatOptions)
    tools: list[Any] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)
    response: ChatResponse | None = None  # set by `before` to answer without the model

    def prompt_messages(self) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + strip_reasoning(self.history) + self.messages

    def user_text(self) -> str:
        return "\n".join(m.get("content") or "" for m in self.messages if m.get("role") == "user")


class Advisor:
    """A link of the chain; every hook defaults to passing things through."""

    order: int = 0

    @property
    def name(self) -> str:
        return type(self).__name__

    def before(self, request: AdvisedRequest) -> AdvisedRequest:
        return request

    def after(self, request: AdvisedRequest, response: ChatResponse) -> ChatResponse:
        return response

    def adapt_chunk(self, request: AdvisedRequest, chunk: ChatResponseChunk) -> ChatResponseChunk:
        return chunk


class MessageChatMemoryAdvisor(Advisor):
    """Puts the conversation's past messages before the new ones, and stores the turn
    (user message, tool rounds, answer with its reasoning) when it is answered.

    The conversation id is `request.context["conversation_id"]`, else the one given here."""

    order = -1000  # outermost: other advisors see the history

    def __init__(self, memory: ChatMemory, conversation_id: str = "default", *, max_messages: int | None = None):
        self.memory = memory
        self.conversation_id = conversation_id
        self.max_messages = max_messages

    def _id(self, request: AdvisedRequest) -> str:
        return str(request.context.get(CONVERSATION_ID, self.conversation_id))

    def before(self, request: AdvisedRequest) -> AdvisedRequest:
        request.history = self.memory.get(self._id(request), self.max_messages) + request.history
        return request

    def after(self, request: AdvisedRequest, response: ChatResponse) -> ChatResponse:
        turn = response.messages or [response.to_message()]
        self.memory.add(self._id(request), list(request.messages) + turn)
        return response


class PromptChatMemoryAdvisor(MessageChatMemoryAdvisor):
    """Like `MessageChatMemoryAdvisor`, but the past conversation goes into the system text
    (a MEMORY section, one ``role: text`` line per user or assistant message, as Spring AI's
    PromptChatMemoryAdvisor writes it) instead of as messages. The turn is stored the same
    way. Reasoning and tool messages stay out of the memory text; with no history the
    system text is left as it is.

    `system_text_advise` is the template: ``{instructions}`` (the request's system text) and
    ``{memory}``."""

    DEFAULT_SYSTEM_TEXT_ADVISE = (
        "{instructions}\n\n"
        "Use the conversation memory from the MEMORY section to provide accurate answers.\n\n"
        "---------------------\n"
        "MEMORY:\n"
        "{memory}\n"
        "---------------------\n"
    )

    def __init__(self, memory: ChatMemory, conversation_id: str = "default", *, max_messages: int | None = None,
                 system_text_advise: str | None = None):
        super().__init__(memory, conversation_id, max_messages=max_messages)
        self.system_text_advise = system_text_advise or self.DEFAULT_SYSTEM_TEXT_ADVISE

    @staticmethod
    def memory_text(messages: list[Message]) -> str:
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages
                         if m.get("role") in ("user", "assistant") and m.get("content"))

    def before(self, request: AdvisedRequest) -> AdvisedRequest:
        memory = self.memory_text(self.memory.get(self._id(request), self.max_messages))
        if memory:
            system = self.system_text_advise.format(instructions=request.system or "", memory=memory)
            request.system = system.lstrip("\n")
        return request


class SimpleLoggerAdvisor(Advisor):
    """Logs each request and answer (logger ``qwenkit.client``, DEBUG unless told)."""

    order = 1000  # innermost: logs what the model is sent

    def __init__(self, level: int = logging.DEBUG, log: logging.Logger | None = None):
        self.level = level
        self.log = log or logger

    def before(self, request: AdvisedRequest) -> AdvisedRequest:
        self.log.log(self.level, "request: messages=%s options=%s", request.prompt_messages(),
                     request.options.model_dump(exclude_none=True))
        return request

    def after(self, request: AdvisedRequest, response: ChatResponse) -> ChatResponse:
        self.log.log(self.level, "response: content=%r reasoning=%r tool_calls=%s finish_reason=%s usage=%s",
                     response.content, response.reasoning_content, response.tool_calls, response.finish_reason,
                     response.usage)
        return response


class ReasoningContentAdvisor(Advisor):
    """Folds the reasoning into the text as ``<think>...</think>`` before the answer, as
    Spring AI Alibaba's seed example does; in a stream the think block is opened at the
    first reasoning piece and closed at the first answer piece (or the end)."""

    _STATE = "_reasoning_advisor_state"

    def __init__(self, order: int = 0):
        self.order = order

    def after(self, request: AdvisedRequest, response: ChatResponse) -> ChatResponse:
        if not response.reasoning_content:
            return response
        return response.replace(content=f"<think>{response.reasoning_content}</think>{response.content or ''}")

    def adapt_chunk(self, request: AdvisedRequest, chunk: ChatResponseChunk) -> ChatResponseChunk:
        state = request.context.get(self._STATE)  # None: not opened; "open"; "closed"
        text = ""
        if chunk.reasoning_content:
            if state is None:
                text, state = "<think>", "open"
            text += chunk.reasoning_content
        if state == "open" and (chunk.content or chunk.tool_calls or chunk.finish_reason):
            text, state = text + "</think>", "closed"
        if state is not None:
            request.context[self._STATE] = state
        if not text:
            return chunk
        return ChatResponseChunk(content=text + chunk.content, tool_calls=chunk.tool_calls,
                                 finish_reason=chunk.finish_reason, usage=chunk.usage)


class SafeGuardAdvisor(Advisor):
    """Answers with `failure_response` instead of calling the model when the user's
    text contains one of `sensitive_words` (case-insensitive)."""

    order = -2000  # before memory: a refused turn is not stored

    def __init__(self, sensitive_words: list[str], failure_response: str = "I'm unable to respond to that "
                 "due to sensitive content. Could we rephrase or discuss something else?"):
        self.sensitive_words = [w.lower() for w in sensitive_words]
        self.failure_response = failure_response

    def before(self, request: AdvisedRequest) -> AdvisedRequest:
        text = request.user_text().lower()
        if any(word in text for word in self.sensitive_words):
            request.response = ChatResponse(content=self.failure_response, finish_reason="stop",
                                            metadata={"blocked_by": self.name})
        return request
