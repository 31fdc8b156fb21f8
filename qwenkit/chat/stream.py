"""The engine's updates for one chat request turned back into chunks (reasoning, content
and tool-call deltas) and completions."""

from __future__ import annotations

from typing import Any

from qwenkit.chat.prepare import PreparedChat
from qwenkit.chat.types import ChatChunk, ChatCompletion, ChatDelta, Usage
from qwenkit.engine.llm_engine import SequenceUpdate, TokenOutput


class ChatStream:
    """Turns the engine's updates for one chat request into chunks and a completion."""

    def __init__(self, request_id: str, prepared: PreparedChat):
        self.request_id = request_id
        self.prepared = prepared
        n = len(prepared.parsers)
        self.num_tokens = [0] * n
        self.finished: list[Any] = [None] * n
        self.num_prompt_tokens = len(prepared.prompt_token_ids)
        self.num_cached_tokens = 0
        # Every generated token of each choice, with its logprobs, when the request asked for them.
        self.logprobs: list[list[TokenOutput]] | None = [[] for _ in range(n)] if prepared.params.logprobs else None

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finished)

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=sum(self.num_tokens),
            reasoning_tokens=sum(f.reasoning_tokens for f in self.finished if f is not None),
            cached_tokens=self.num_cached_tokens,
        )

    def apply(self, update: SequenceUpdate) -> ChatChunk:
        parser = self.prepared.parsers[update.index]
        delta = ChatDelta()
        for token in update.outputs:
            delta.extend(parser.feed(token.token_id, token.text))
        self.num_tokens[update.index] += len(update.outputs)
        self.num_cached_tokens = max(self.num_cached_tokens, update.num_cached_tokens)
        chunk = ChatChunk(update.index, delta)
        if self.logprobs is not None:
            chunk.logprobs = list(update.outputs)
            self.logprobs[update.index].extend(update.outputs)
        if update.finish_reason is not None:
            reason = "stop" if update.finish_reason == "abort" else update.finish_reason
            tail, parts = parser.finish(reason)
            delta.extend(tail)
            self.finished[update.index] = parts
            chunk.finish_reason = parts.finish_reason
            if self.done:
                chunk.usage = self.usage()
        return chunk

    def completions(self) -> list[ChatCompletion]:
        usage = self.usage()
        return [
            ChatCompletion(p.content, p.reasoning_content, p.tool_calls, p.finish_reason, usage, self.request_id)
            for p in self.finished
        ]
