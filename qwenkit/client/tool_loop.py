"""One turn with tools as a state machine without I/O, as h11 is for HTTP.

The machine is fed what the model said (a whole `ChatResponse`, or the chunks of a
stream) and what the tools returned, and answers with the next thing to do: `CallModel`
(these messages, these tool schemas, these options), `RunTools` (these calls, in order;
their result messages come back through `receive_results`) or `Finish` (this response).
`ChatClient`'s call / acall / stream / astream and the `Agent`'s loops are thin shells that
do the I/O it asks for, so the rules live here once:

- each round, every call the model asks for runs once; identical calls (same name, same
  arguments as JSON values) in a round, or asked again later in the turn, are answered
  with the earlier result, not run again;
- a round that asks only for calls already answered ends the loop (`repeated_call`): the
  model is asked once more with the tools withheld and a user line asking it to answer
  from the results. Small models loop so: the default 0.5B one, after
  ``</tool_response>``, writes the same call again at logprob -0.009; asked without
  tools, it still echoes the call as text (``{"name": "get_weather", ...}`` then the
  result as JSON), and with the line it answers in words (measured, greedy). An answer
  that is still only an echo of a call is withheld (`ToolLoopOutcome.withheld_content`),
  never given as the content; in a stream that answer's text is held back until it
  cannot be an echo;
- after `max_rounds` rounds of tools, a response that still asks for a new call ends the
  loop (`max_rounds`) with its calls unrun, as it came. So the model is called at most
  `max_rounds + 1` times.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from qwenkit.client.tools import Tool
from qwenkit.client.types import (
    ChatOptions, ChatResponse, ChatResponseChunk, Message, ResponseAccumulator, ToolCall, ToolLoopEnd,
    ToolLoopOutcome, Usage, add_usage,
)

__all__ = ["ANSWER_REQUEST", "CallModel", "Finish", "RunTools", "ToolLoop", "is_tool_call_echo"]

# The line added (for the last call only, not kept in the turn) when the loop ends on a repeat.
ANSWER_REQUEST = ("Answer my question now from the tool results above, in plain words. "
                  "Do not call a tool.")


@dataclass(frozen=True)
class CallModel:
    """Call the model with these messages, tools (None: none offered) and options."""

    messages: list[Message]
    tools: list[dict[str, Any]] | None
    options: ChatOptions


@dataclass(frozen=True)
class RunTools:
    """Run these calls, in order, and give their tool messages to `receive_results`.
    `response` is the model's answer that asked for them (its text, its reasoning)."""

    calls: list[ToolCall]
    response: ChatResponse


@dataclass(frozen=True)
class Finish:
    """The turn is over: `response` carries the turn's messages, the summed usage and,
    when tools were offered, the `ToolLoopOutcome`."""

    response: ChatResponse


Action = CallModel | RunTools | Finish


class ToolLoop:
    """One turn: `start()`, then feed each `CallModel` the model's answer (`receive_response`,
    or `receive_chunk` for each streamed chunk then `end_stream`), each `RunTools` the tool
    messages (`receive_results`), until `Finish`. `tools` is the name -> `Tool` table the
    shells run calls with."""

    def __init__(self, prompt: list[Message], options: ChatOptions, tools: list[Tool], *, max_rounds: int):
        self.prompt = list(prompt)
        self.options = options
        self.tools = {t.name: t for t in tools}
        self.schemas = [t.schema() for t in tools] or None
        self.max_rounds = max_rounds
        self.turn: list[Message] = []  # the assistant and tool messages so far
        self.usage: Usage | None = None
        self.rounds = 0
        self.results: list[Message] = []
        self.answered: dict[tuple[str, str], Message] = {}  # call key -> the tool message that answered it
        self.repeated: list[ToolCall] = []
        self.reused: list[tuple[ToolCall, Message]] = []  # calls of the last round answered from earlier results
        self._asked: ChatResponse | None = None  # the response whose calls are running
        self._running: list[ToolCall] = []
        self._stream: ResponseAccumulator | None = None
        self._guard: _EchoGuard | None = None

    @property
    def is_answering(self) -> bool:
        """Whether the model is being asked for its last answer, tools withheld, after a repeat."""
        return bool(self.repeated)

    def start(self) -> CallModel:
        return self._call_model()

    def receive_response(self, response: ChatResponse) -> Action:
        """The model's answer to the last `CallModel`."""
        self.usage = add_usage(self.usage, response.usage)
        if self.is_answering:
            return self._finish(response, ToolLoopEnd.REPEATED_CALL)
        if self.schemas is None or not response.tool_calls:
            return self._finish(response, ToolLoopEnd.ANSWERED)
        running, keys = [], set()
        for call in response.tool_calls:
            key = _call_key(call)
            if key not in self.answered and key not in keys:
                running.append(call)
                keys.add(key)
        if not running:  # nothing new to learn: ask for the answer, tools withheld
            self.repeated = list(response.tool_calls)
            return self._call_model()
        if self.rounds >= self.max_rounds:
            return self._finish(response, ToolLoopEnd.MAX_ROUNDS)
        self._asked, self._running = response, running
        return RunTools(running, response)

    def receive_results(self, results: list[Message]) -> CallModel:
        """The tool messages of the last `RunTools`' calls, in order."""
        if self._asked is None or len(results) != len(self._running):
            raise ValueError(f"expected {len(self._running)} tool results, got {len(results)}")
        for call, result in zip(self._running, results):
            self.answered[_call_key(call)] = result
        ran = {id(call) for call in self._running}
        messages, self.reused = [], []
        for call in self._asked.tool_calls:
            result = self.answered[_call_key(call)]
            if result.get("tool_call_id") != call.id:
                result = {**result, "tool_call_id": call.id}
            if id(call) not in ran:
                self.reused.append((call, result))
            messages.append(result)
        self.turn += [self._asked.to_message()] + messages
        self.results += messages
        self.rounds += 1
        self._asked, self._running = None, []
        return self._call_model()

    # -- streams ---------------------------------------------------------------------

    def receive_chunk(self, chunk: ChatResponseChunk) -> list[ChatResponseChunk]:
        """A chunk of the model's streamed answer; the chunks to pass on now (a last answer
        is held back while it may be an echo of a call)."""
        self._stream.add(chunk)
        return self._guard.add(chunk) if self._guard else [chunk]

    def end_stream(self) -> tuple[list[ChatResponseChunk], Action]:
        """The stream ended: the chunks still held back, and the next action."""
        guard = self._guard  # this answer's (receive_response may start the next call)
        action = self.receive_response(self._stream.response())
        if guard is None:
            return [], action
        return guard.release(is_echo=action.response.tool_loop.withheld_content is not None), action

    # -- inside ----------------------------------------------------------------------

    def _call_model(self) -> CallModel:
        self._stream = ResponseAccumulator()
        self._guard = _EchoGuard() if self.is_answering else None
        if self.is_answering:
            options = self.options.model_copy(update={"tool_choice": None, "parallel_tool_calls": None})
            request = {"role": "user", "content": ANSWER_REQUEST}
            return CallModel(self.prompt + self.turn + [request], None, options)
        return CallModel(self.prompt + self.turn, self.schemas, self.options)

    def _finish(self, response: ChatResponse, reason: ToolLoopEnd) -> Finish:
        withheld = None
        if self.is_answering:  # tools were withheld: calls it wrote anyway are not calls
            response = response.replace(tool_calls=[])
            if is_tool_call_echo(response.content, self.tools):
                withheld = response.content
                response = response.replace(content=None)
        message = response.to_message()
        if withheld is not None:
            message["content"] = ""  # an assistant message needs content or tool calls
        self.turn.append(message)
        outcome = None
        if self.schemas is not None:
            outcome = ToolLoopOutcome(reason, self.rounds, tuple(self.results), tuple(self.repeated), withheld)
        return Finish(response.replace(messages=self.turn, usage=self.usage, tool_loop=outcome))


def _call_key(call: ToolCall) -> tuple[str, str]:
    """A tool call's name and arguments, compared as JSON values (not as text)."""
    try:
        arguments = json.dumps(json.loads(call.arguments or "{}"), sort_keys=True)
    except ValueError:
        arguments = call.arguments
    return call.name, arguments


_FENCE = "```"
_TAG = "<tool_call>"


def is_tool_call_echo(text: str | None, tool_names: Any) -> bool:
    """Whether `text` is only a tool call written out: it starts with ``<tool_call>``, or
    it is a run of JSON objects (bare or in ```json fences) of which one has the shape
    ``{"name": <a tool's name>, "arguments" | "parameters": ...}``. Text that begins as
    prose is never an echo (so a stream can pass it on as soon as it begins)."""
    text = (text or "").strip()
    if text.startswith(_TAG):
        return True
    decoder, objects, at = json.JSONDecoder(), [], 0
    while at < len(text):
        if text.startswith(_FENCE, at):
            at += len(_FENCE)
            if text.startswith("json", at):
                at += len("json")
        else:
            try:
                value, at = decoder.raw_decode(text, at)
            except ValueError:
                return False
            if not isinstance(value, dict):
                return False
            objects.append(value)
        while at < len(text) and text[at].isspace():
            at += 1
    return any(o.get("name") in tool_names and ("arguments" in o or "parameters" in o) for o in objects)


def _may_become_echo(text: str) -> bool:
    text = text.lstrip()
    return (text.startswith(("{", _FENCE, _TAG)) or _FENCE.startswith(text) or _TAG.startswith(text))


class _EchoGuard:
    """Holds back a last answer's chunks from its first text until the text cannot be an
    echo of a call (`_may_become_echo` is false); those that stay held to the end are
    released whole, or without their text when it was an echo. Tool-call pieces are
    dropped: no tools were offered."""

    def __init__(self) -> None:
        self.held: list[ChatResponseChunk] = []
        self.text = ""
        self.is_open = False

    def add(self, chunk: ChatResponseChunk) -> list[ChatResponseChunk]:
        chunk = replace(chunk, tool_calls=[])
        if self.is_open or (not self.held and not chunk.content):
            return [chunk]
        self.text += chunk.content
        self.held.append(chunk)
        if _may_become_echo(self.text):
            return []
        self.is_open = True
        held, self.held = self.held, []
        return held

    def release(self, *, is_echo: bool) -> list[ChatResponseChunk]:
        held, self.held = self.held, []
        if not is_echo:
            return held
        held = [replace(c, content="") for c in held]
        return [c for c in held if c.reasoning_content or c.finish_reason or c.usage]
