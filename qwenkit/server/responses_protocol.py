"""OpenAI's Responses API (``POST /v1/responses``), translated to and from chat engine calls.

Pure functions and small state objects, no I/O, like `openai_protocol`: a request
(validated by the pydantic models below) and the stored conversation it continues become
a `ResponsesCall` (a typed `ChatRequest`); the engine's `ChatChunk`s become the typed
stream events and the final ``response`` object (`ResponsesAnswer` writes either). Shapes follow the `openai` SDK's ``openai.types.responses`` models
(checked by tests/test_responses_protocol.py against SDK 3.54).

What is translated:

* ``input``: a string (one user message) or items: messages (``role`` user / system /
  developer / assistant, ``content`` a string or ``input_text`` / ``output_text`` parts),
  ``function_call`` (an assistant's call), ``function_call_output`` (its result, a tool
  message) and ``reasoning`` (the reasoning of the assistant turn that follows it).
  ``instructions`` is a system message first; it is not carried to later responses.
* ``tools`` (``{"type": "function", "name", "description", "parameters"}``),
  ``tool_choice`` and ``parallel_tool_calls`` as on chat completions.
* ``text.format`` (``text`` / ``json_object`` / ``json_schema``) is chat's
  ``response_format``; ``reasoning.effort: "none"`` turns thinking off.
* Output: a ``reasoning`` item (``content: [{"type": "reasoning_text"}]``) from the
  thinking, a ``message`` item with one ``output_text`` part, one ``function_call`` item
  per call. A response cut by ``max_output_tokens`` is ``incomplete``.

* ``previous_response_id`` or ``conversation`` (one, not both): the turns the request
  continues, from the store (`response_store`).

Every string of a request (keys too) must be valid Unicode: JSON's lone surrogates are a
400 naming the field (`check_unicode`), before anything is generated or stored; booleans
and numbers are strict, as OpenAI's are (``"store": "yes"`` is a 400).

Not supported (a 400 naming the field): non-function tools, ``background``, ``prompt``,
images and files in input. ``include`` and ``truncation`` are accepted and ignored; no
logprobs are returned.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model, model_serializer

from qwenkit import sampling_fields as sf
from qwenkit.chat.request import ChatRequest
from qwenkit.chat.types import ChatChunk, Usage
from qwenkit.multimodal.chat import protocol_content
from qwenkit.sampling import SamplingParams
from qwenkit.server import openai_protocol as oa
from qwenkit.server.errors import APIError


class _Model(BaseModel):
    # Strict, as OpenAI is: "store": "yes" is not a boolean nor "1" a number.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)


# OpenAI's bounds on metadata: 16 pairs, keys of 64 characters, values of 512.
Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                     Field(max_length=16)]


# -- request -------------------------------------------------------------------------


class FunctionTool(_Model):
    """A function the model may call (the Responses form: no nested ``function``). Other
    tool types are refused by name, so ``name`` is checked where ``type`` is."""

    type: str = "function"
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(_Model):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_serializer(mode="wrap")
    def _without_nones(self, handler):  # {"type": "text"}, not five nulls beside it
        return {key: value for key, value in handler(self).items() if value is not None}


class TextConfig(_Model):
    format: TextFormat = Field(default_factory=TextFormat)
    verbosity: str | None = None


class ReasoningConfig(_Model):
    effort: str | None = None
    summary: str | None = None


_TEXT_PART = {"type": "object", "required": ["type", "text"], "properties": {
    "type": {"enum": ["input_text", "output_text", "text"]}, "text": {"type": "string"}}}
_IMAGE_PART = {"type": "object", "required": ["type", "image_url"], "properties": {
    "type": {"enum": ["input_image"]}, "image_url": {"type": "string", "description": "a data: URL"},
    "detail": {"type": "string"}}}
_REASONING_PARTS = {"anyOf": [{"type": "null"}, {"type": "array", "items": {
    "type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}}]}
# The items `input_messages` reads, published as such (the validation is that function's).
INPUT_ITEM_SCHEMA = {"anyOf": [
    {"title": "Message", "type": "object", "required": ["role", "content"], "properties": {
        "type": {"enum": ["message"]}, "role": {"enum": ["user", "system", "developer", "assistant"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"anyOf": [_TEXT_PART, _IMAGE_PART]}}]}}},
    {"title": "FunctionCall", "type": "object", "required": ["type", "call_id", "name", "arguments"],
     "properties": {"type": {"enum": ["function_call"]}, "call_id": {"type": "string"},
                    "name": {"type": "string"}, "arguments": {"type": "string"}}},
    {"title": "FunctionCallOutput", "type": "object", "required": ["type", "call_id", "output"], "properties": {
        "type": {"enum": ["function_call_output"]}, "call_id": {"type": "string"},
        "output": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}}},
    {"title": "Reasoning", "type": "object", "required": ["type"], "properties": {
        "type": {"enum": ["reasoning"]}, "summary": _REASONING_PARTS, "content": _REASONING_PARTS}},
]}
InputItem = Annotated[dict[str, Any], WithJsonSchema(INPUT_ITEM_SCHEMA)]


# The Responses API's sampling fields from the one table (qwenkit/sampling_fields.py):
# the chat route's types and ranges (max_tokens is max_output_tokens here).
_SamplingFields = create_model("_SamplingFields", __base__=_Model, **sf.pydantic_fields("responses"))


class ResponsesRequest(_SamplingFields):
    model: str | None = None
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    previous_response_id: str | None = None
    store: bool | None = None  # OpenAI's default: true
    stream: bool | None = False
    metadata: Metadata | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    user: str | None = None


def check_unicode(value: Any, where: str = "") -> None:
    """A 400 naming the first string in ``value`` (JSON-like; keys too) that UTF-8 cannot
    hold: JSON's lone surrogates ("\\ud800") parse into Python strings that SQLite, the
    tokenizer and the response cannot take, so a request holding one is refused before
    anything is generated or stored."""
    bad = _non_unicode_path(value, where)
    if bad is not None:
        raise APIError(400, f"{bad or 'the request'} holds text that is not valid Unicode (a lone surrogate)",
                       param=bad or None)


def _non_unicode_path(value: Any, where: str) -> str | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            bad = _non_unicode_path(key, path)
            if bad is None:
                bad = _non_unicode_path(item, path)
            if bad is not None:
                return bad
    elif isinstance(value, list):
        for i, item in enumerate(value):
            bad = _non_unicode_path(item, f"{where}[{i}]")
            if bad is not None:
                return bad
    return None


@dataclass(frozen=True)
class ResponsesCall:
    """The chat call a Responses request asks for, and the conversation it extends
    (earlier turns and this input, without ``instructions``), which is stored with the
    response's output for a later ``previous_response_id``; ``input_items``: this
    request's input as items with ids (``GET /v1/responses/{id}/input_items``, and what a
    ``conversation`` gains)."""

    request: ChatRequest
    conversation: list[dict[str, Any]]
    input_items: list[dict[str, Any]] = field(default_factory=list)


def conversation_id(req: ResponsesRequest) -> str | None:
    """The conversation a request continues (``"conv_..."`` or ``{"id": "conv_..."}``)."""
    ref = req.conversation
    if ref is None:
        return None
    if isinstance(ref, dict):
        ref = ref.get("id")
    if not isinstance(ref, str) or not ref:
        raise ValueError("conversation must be a conversation id or {'id': ...}")
    if req.previous_response_id:
        raise ValueError("conversation and previous_response_id cannot both be given: use one")
    return ref


def responses_call(req: ResponsesRequest, previous: list[dict[str, Any]] | None = None) -> ResponsesCall:
    """The engine call of a request; ``previous``: the chat messages it continues (the
    stored conversation that ``previous_response_id`` names, or the items of its
    ``conversation``). ValueError (a 400) names a bad field."""
    conversation_id(req)
    if req.prompt is not None:
        raise ValueError("prompt is not supported: send the conversation as input (or previous_response_id)")
    if req.background:
        raise ValueError("background is not supported: responses are generated while the request waits")
    conversation = [*(previous or []), *input_messages(req.input)]
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
    if not any(m["role"] in ("user", "tool") for m in messages):
        raise ValueError("input must hold a user message or a function_call_output")
    params = SamplingParams(
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        repetition_penalty=req.repetition_penalty, seed=req.seed, max_tokens=req.max_output_tokens,
    )
    effort = req.reasoning.effort if req.reasoning else None
    enable_thinking = req.enable_thinking if req.enable_thinking is not None else effort != "none"
    request = ChatRequest(
        messages, params,
        enable_thinking=enable_thinking,
        thinking_budget=req.thinking_budget,
        tools=[chat_tool(t, i) for i, t in enumerate(req.tools)] if req.tools else None,
        tool_choice=chat_tool_choice(req.tool_choice),
        parallel_tool_calls=True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        response_format=response_format(req.text.format) if req.text else None,
    )
    return ResponsesCall(request, conversation, listed_items(req.input))


def chat_tool(tool: FunctionTool, index: int) -> dict[str, Any]:
    """The chat form of a Responses function tool, laid out as the chat route lays out the
    same tool (`openai_protocol.Tool`): the template writes it as it is, so a different key
    order is a different prompt (the model copied pydantic's ``title`` as the name)."""
    if tool.type != "function":
        raise ValueError(f"tools[{index}].type {tool.type!r} is not supported: only function tools are")
    if not tool.name:
        raise ValueError(f"tools[{index}].name is required")
    strict = {} if tool.strict is None else {"strict": tool.strict}  # chat keeps it, after the declared fields
    function = oa.FunctionSpec(name=tool.name, description=tool.description, parameters=tool.parameters, **strict)
    return oa.Tool(function=function).model_dump(exclude_none=True)


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any]:
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice  # auto / none / required; anything else: ChatRequest names it
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise ValueError(f"tool_choice must be auto, none, required or {{'type': 'function', 'name': ...}}, got {choice}")


def response_format(fmt: TextFormat) -> dict[str, Any] | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.json_schema is None:
        raise ValueError("text.format.schema is required for json_schema")
    return {"type": "json_schema",
            "json_schema": {"name": fmt.name or "response", "schema": fmt.json_schema, "strict": fmt.strict}}


def input_messages(items: str | list[dict[str, Any]], name: str = "input") -> list[dict[str, Any]]:
    """Chat messages from ``input`` (or a conversation's items; ``name`` is the field
    errors name): consecutive ``function_call`` items join the assistant message before
    them, a ``reasoning`` item goes to the assistant turn after it."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    reasoning: str | None = None
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be an item object, got {type(item).__name__}")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ValueError(f"{where}.role must be user, system, developer or assistant, got {role!r}")
            message: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                       "content": _content(item.get("content"), f"{where}.content")}
            if role == "assistant" and reasoning is not None:
                message["reasoning_content"], reasoning = reasoning, None
            messages.append(message)
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant" or reasoning is not None:
                last = {"role": "assistant", "content": ""}
                if reasoning is not None:
                    last["reasoning_content"], reasoning = reasoning, None
                messages.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                             "content": _text(item.get("output"), f"{where}.output")})
        elif kind == "reasoning":
            # The reasoning text itself (content), else its summary.
            content, summary = _reasoning_parts(item, "content", where), _reasoning_parts(item, "summary", where)
            reasoning = "".join(content or summary) or None
        else:
            raise ValueError(f"{where}.type {kind!r} is not supported: use message, function_call, "
                             "function_call_output or reasoning items")
    return messages


_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def listed_items(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as OpenAI lists them (input items of a response, a conversation's
    items): each with its ``id`` (kept if the client gave one), ``type`` and ``status``; a
    message's content as text parts. Call after `input_messages` has checked them."""
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    out = []
    for item in items:
        kind = item.get("type", "message")
        listed = {"id": item["id"] if isinstance(item.get("id"), str) and item["id"] else new_id(_ID_PREFIXES[kind]),
                  **{key: value for key, value in item.items() if key != "id"}, "type": kind}
        if kind == "message" and isinstance(item["content"], str):
            part = "output_text" if item["role"] == "assistant" else "input_text"
            listed["content"] = [{"type": part, "text": item["content"],
                                  **({"annotations": []} if part == "output_text" else {})}]
        if kind != "reasoning" or "status" in item:
            listed.setdefault("status", "completed")
        if kind == "reasoning":
            listed.setdefault("summary", [])
        out.append(listed)
    return out


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{where}.{key} must be a string")
    return value


def _reasoning_parts(item: dict[str, Any], key: str, where: str) -> list[str]:
    """The texts of a reasoning item's ``content`` or ``summary``: a list of parts with a
    string ``text`` (``reasoning_text``, ``summary_text``), or absent."""
    parts = item.get(key)
    if parts is None:
        return []
    if not isinstance(parts, list):
        raise ValueError(f"{where}.{key} must be a list of parts, got {type(parts).__name__}")
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.{key}[{j}] must be a part with a string text")
    return [part["text"] for part in parts]


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content: a string, or text parts joined, or (with `input_image` parts, data:
    URLs) the parts in order for a vision-language model's template."""
    if isinstance(content, list):
        return protocol_content(content, where)
    return _text(content, where)


def _text(content: Any, where: str) -> str:
    """A string, or the text of ``input_text`` / ``output_text`` (and ``text``) parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where} must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}[{j}]: only text parts are supported, got a {kind!r} part")
        texts.append(part["text"])
    return "".join(texts)


# -- response ------------------------------------------------------------------------


class OutputText(_Model):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)


class OutputMessage(_Model):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCallItem(_Model):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class ReasoningText(_Model):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(_Model):
    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[ReasoningText]
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = Annotated[OutputMessage | FunctionCallItem | ReasoningItem, Field(discriminator="type")]


class InputTokensDetails(_Model):
    cached_tokens: int
    cache_write_tokens: int = 0


class OutputTokensDetails(_Model):
    reasoning_tokens: int


class ResponseUsage(_Model):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> ResponseUsage:
        return cls(input_tokens=usage.prompt_tokens,
                   input_tokens_details=InputTokensDetails(cached_tokens=usage.cached_tokens),
                   output_tokens=usage.completion_tokens,
                   output_tokens_details=OutputTokensDetails(reasoning_tokens=usage.reasoning_tokens),
                   total_tokens=usage.total_tokens)


class IncompleteDetails(_Model):
    reason: Literal["max_output_tokens"]


class ConversationRef(_Model):
    id: str


class Response(_Model):
    """The ``response`` object (``object: "response"``)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[OutputItem]
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    tools: list[FunctionTool]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    previous_response_id: str | None = None
    conversation: ConversationRef | None = None
    reasoning: ReasoningConfig | None = None
    text: TextConfig
    truncation: str = "disabled"
    store: bool
    metadata: dict[str, str] = Field(default_factory=dict)
    usage: ResponseUsage | None = None
    user: str | None = None


class ResponseDeleted(_Model):
    """What ``DELETE /v1/responses/{id}`` answers."""

    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


class ItemList(_Model):
    """A page of items (a response's input items, a conversation's items): OpenAI's
    cursor page, ``after`` the ``last_id`` of the page before."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


def item_page(items: list[dict[str, Any]], *, order: str, limit: int, after: str | None) -> ItemList:
    """One page of ``items`` (stored oldest first) in ``order`` ("asc" / "desc"), after the
    item whose id is ``after`` (a 404 if it names no item)."""
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise APIError(404, f"after {after!r} names no item of this list", param="after", code="not_found")
        ordered = ordered[ids.index(after) + 1:]
    page = ordered[:limit]
    return ItemList(data=page, first_id=page[0]["id"] if page else None, last_id=page[-1]["id"] if page else None,
                    has_more=len(ordered) > limit)


class InputTokens(_Model):
    """What ``POST /v1/responses/input_tokens`` answers."""

    object: Literal["response.input_tokens"] = "response.input_tokens"
    input_tokens: int


def new_id(prefix: str) -> str:
    """``resp_``, ``msg_``, ``fc_``, ``rs_`` and 48 random hex digits (OpenAI's lengths)."""
    return f"{prefix}_{secrets.token_hex(24)}"


@dataclass
class ResponseBuilder:
    """One request's chat chunks -> Responses stream events and the final ``response``.

    ``start()`` gives ``response.created`` / ``response.in_progress``; each ``add(chunk)``
    the events of the output it carries (items open as their first text or call arrives
    and close when another kind of output starts); ``finish()`` closes the last item and
    gives ``response.completed`` (or ``response.incomplete``). Events are JSON-ready dicts
    numbered by ``sequence_number``."""

    id: str
    model: str
    request: ResponsesRequest
    created_at: int = field(default_factory=lambda: int(time.time()))
    output: list[dict[str, Any]] = field(default_factory=list)
    usage: Usage | None = None
    finish_reason: str | None = None
    _sequence: int = 0
    _open: dict[str, Any] | None = None  # the item being written
    _final: Response | None = None

    def start(self) -> list[dict[str, Any]]:
        snapshot = self.response("in_progress").model_dump(mode="json", by_alias=True)
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def add(self, chunk: ChatChunk) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        delta = chunk.delta
        if delta.reasoning_content:
            item = self._item("reasoning", events)
            events.append(self._text_delta(item, "response.reasoning_text.delta", delta.reasoning_content))
        if delta.content:
            item = self._item("message", events)
            events.append(self._text_delta(item, "response.output_text.delta", delta.content, logprobs=[]))
        for piece in delta.tool_calls:
            if piece.id is not None or self._kind() != "function_call":
                self._close(events)
                item = {"id": new_id("fc"), "type": "function_call", "call_id": piece.id or new_id("call"),
                        "name": piece.name or "", "arguments": "", "status": "in_progress"}
                self._add_item(item, events)
            if piece.arguments:
                self._open["arguments"] += piece.arguments
                events.append(self._event("response.function_call_arguments.delta", item_id=self._open["id"],
                                          output_index=len(self.output) - 1, delta=piece.arguments))
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            self.usage = chunk.usage
        return events

    def finish(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        self._close(events)
        response = self.final().model_dump(mode="json", by_alias=True)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        events.append(self._event(kind, response=response))
        return events

    def error_event(self, message: str, *, code: str | None, param: str | None) -> dict[str, Any]:
        """The ``error`` event a stream ends with when generation fails after it started."""
        return self._event("error", code=code, message=message, param=param)

    def final(self) -> Response:
        """The finished ``response`` (made once: its ``completed_at`` stays put)."""
        if self._final is None:
            self._final = self.response()
        return self._final

    def response(self, status: str | None = None) -> Response:
        """The ``response`` object: ``status`` in_progress while streaming, else as finished."""
        req = self.request
        incomplete = status is None and self.finish_reason == "length"
        status = status or ("incomplete" if incomplete else "completed")
        return Response(
            id=self.id, created_at=self.created_at, status=status, model=self.model,
            completed_at=int(time.time()) if status == "completed" else None,
            output=[_closed(item, incomplete) for item in self.output] if status != "in_progress" else [],
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if incomplete else None,
            instructions=req.instructions, tools=req.tools or [],
            tool_choice=req.tool_choice if req.tool_choice is not None else "auto",
            parallel_tool_calls=True if req.parallel_tool_calls is None else req.parallel_tool_calls,
            temperature=req.temperature, top_p=req.top_p, max_output_tokens=req.max_output_tokens,
            previous_response_id=req.previous_response_id, reasoning=req.reasoning, text=req.text or TextConfig(),
            conversation=ConversationRef(id=conversation_id(req)) if req.conversation is not None else None,
            truncation=req.truncation or "disabled", store=req.store is not False, metadata=req.metadata or {},
            usage=ResponseUsage.of(self.usage) if self.usage is not None and status != "in_progress" else None,
            user=req.user,
        )

    def assistant_message(self) -> dict[str, Any] | None:
        """The output as one chat message (what a later ``previous_response_id`` continues)."""
        message: dict[str, Any] = {"role": "assistant", "content": ""}
        for item in self.output:
            if item["type"] == "reasoning":
                message["reasoning_content"] = "".join(part["text"] for part in item["content"])
            elif item["type"] == "message":
                message["content"] += "".join(part["text"] for part in item["content"])
            else:
                message.setdefault("tool_calls", []).append(
                    {"id": item["call_id"], "type": "function",
                     "function": {"name": item["name"], "arguments": item["arguments"]}})
        return message if len(message) > 2 or message["content"] else None

    # -- items ---------------------------------------------------------------------------

    def _kind(self) -> str | None:
        return self._open["type"] if self._open is not None else None

    def _item(self, kind: str, events: list[dict[str, Any]]) -> dict[str, Any]:
        """The open item of ``kind``, opening one (and closing another) if needed."""
        if self._kind() == kind:
            return self._open
        self._close(events)
        if kind == "reasoning":
            item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": []}
        self._add_item(item, events)
        item["content"].append(part)
        events.append(self._event("response.content_part.added", item_id=item["id"],
                                  output_index=len(self.output) - 1, content_index=0, part=dict(part)))
        return item

    def _add_item(self, item: dict[str, Any], events: list[dict[str, Any]]) -> None:
        self.output.append(item)
        self._open = item
        events.append(self._event("response.output_item.added", output_index=len(self.output) - 1,
                                  item=json.loads(json.dumps(item))))

    def _text_delta(self, item: dict[str, Any], kind: str, text: str, **extra: Any) -> dict[str, Any]:
        item["content"][0]["text"] += text
        return self._event(kind, item_id=item["id"], output_index=len(self.output) - 1, content_index=0,
                           delta=text, **extra)

    def _close(self, events: list[dict[str, Any]]) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        index = self.output.index(item)
        if item["type"] == "function_call":
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, arguments=item["arguments"]))
        else:
            part = item["content"][0]
            kind = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
            extra = {} if item["type"] == "reasoning" else {"logprobs": []}
            events.append(self._event(kind, item_id=item["id"], output_index=index, content_index=0,
                                      text=part["text"], **extra))
            events.append(self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                      content_index=0, part=dict(part)))
        events.append(self._event("response.output_item.done", output_index=index,
                                  item=_closed(item, self.finish_reason == "length")))

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event


class ResponsesAnswer:
    """A response written as typed events or as one ``response`` object (see
    `qwenkit.server.respond.Answer`). ``save`` stores the finished response (and returns
    it) before a stream tells the client it is complete, as the client may go on from it."""

    def __init__(self, builder: ResponseBuilder, save: Callable[[], Awaitable[Response]]):
        self.builder = builder
        self.save = save

    def start(self) -> list[bytes]:
        return [sse(event) for event in self.builder.start()]

    def events(self, chunk: ChatChunk) -> list[bytes]:
        return [sse(event) for event in self.builder.add(chunk)]

    def fail(self, error: APIError) -> list[bytes]:
        return [sse(self.builder.error_event(error.message, code=error.code, param=error.param))]

    async def end(self) -> list[bytes]:
        last = self.builder.finish()
        await self.save()
        return [sse(event) for event in last]

    def add(self, chunk: ChatChunk) -> None:
        self.builder.add(chunk)

    async def whole(self) -> Response:
        return await self.save()


def sse(event: dict[str, Any]) -> bytes:
    """One server-sent event as OpenAI writes the Responses stream (named by its type)."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def _closed(item: dict[str, Any], incomplete: bool) -> dict[str, Any]:
    """A copy of an output item with its final status."""
    out = json.loads(json.dumps(item))
    out["status"] = "incomplete" if incomplete and item["type"] == "message" else "completed"
    return out
