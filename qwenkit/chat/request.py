"""A chat request, typed and validated once, from where it is built to the engine.

The protocol modules of the server (OpenAI, DashScope, Responses) build a
:class:`ChatRequest` from their JSON; `LLM.chat` and `AsyncLLM.chat` build one from their
keyword arguments (:func:`chat_request`). Each field is checked in ``__post_init__``, with
a ValueError naming it, and nothing downstream checks it again: `prepare_chat` renders
the prompt and builds the grammar and the thinking budget from it as it is. No torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from qwenkit.chat.thinking import effective_enable_thinking, resolve_thinking_mode
from qwenkit.sampling import SamplingParams

TOOL_CHOICES = ("none", "auto", "required")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")

# Names a template variable cannot take: the chat template's own arguments, and the
# request's fields (`enable_thinking` is one; a template variable of that name would be ambiguous).
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "tools", "add_generation_prompt", "tokenize", "enable_thinking", "thinking_budget",
    "sampling_params", "tool_choice", "response_format", "parallel_tool_calls", "chat_template_kwargs",
})


@dataclass(frozen=True)
class ChatRequest:
    """A conversation to answer, and how.

    messages: OpenAI-style message dicts (an assistant's earlier ``tool_calls`` may give
    ``arguments`` as a JSON string; it is parsed to an object here). sampling_params: None
    for the model's defaults, until the context ends. enable_thinking: Qwen3's thinking
    mode (``/think`` and ``/no_think`` in the latest user or system turn switch it).
    thinking_budget: the most thinking tokens before the model is told to answer (0: no
    thinking); separate from max_tokens, which counts every generated token. tools /
    tool_choice: OpenAI-style function tools; "required" or a named function
    (``{"type": "function", "function": {"name": ...}}``) is enforced by constrained
    decoding, as is response_format (``{"type": "json_object"}`` or ``{"type":
    "json_schema", "json_schema": {"schema": ...}}``). parallel_tool_calls=False holds
    "required" to a single call. chat_template_kwargs: more variables for the chat
    template.
    """

    messages: list[dict[str, Any]]
    sampling_params: SamplingParams | None = None
    enable_thinking: bool = True
    thinking_budget: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalized values are set once, here
        set_(self, "messages", parse_tool_call_arguments(_messages(self.messages)))
        if self.sampling_params is not None and not isinstance(self.sampling_params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(self.sampling_params).__name__}")
        _check_bool("enable_thinking", self.enable_thinking)
        _check_bool("parallel_tool_calls", self.parallel_tool_calls)
        budget = self.thinking_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(f"thinking_budget must be an integer >= 0, got {budget!r}")
        set_(self, "tools", _tools(self.tools))
        _check_tool_choice(self.tool_choice, self.tools)
        _check_response_format(self.response_format)
        set_(self, "chat_template_kwargs", _template_kwargs(self.chat_template_kwargs))

    @property
    def thinking(self) -> bool:
        """Whether the template is rendered with thinking on: ``enable_thinking`` after the
        soft switch, and off for a thinking budget of 0."""
        return effective_enable_thinking(resolve_thinking_mode(self.messages, self.enable_thinking),
                                         self.thinking_budget)

    @property
    def offered_tools(self) -> list[dict[str, Any]] | None:
        """The tools the model is shown (none with tool_choice "none")."""
        return None if self.tool_choice == "none" else self.tools

    @property
    def named_tool(self) -> str | None:
        """The function a named tool_choice forces, else None."""
        return self.tool_choice["function"]["name"] if isinstance(self.tool_choice, dict) else None

    @property
    def needs_grammar(self) -> bool:
        """Whether constrained decoding enforces the answer (a forced tool call, a JSON answer)."""
        forced_call = self.named_tool is not None or self.tool_choice == "required"
        return forced_call or self.answer_is_json

    @property
    def answer_is_json(self) -> bool:
        return self.response_format is not None and self.response_format["type"] != "text"


_OPTIONS = frozenset(f.name for f in fields(ChatRequest)) - {"messages", "sampling_params"}


def chat_request(messages: list[dict[str, Any]] | ChatRequest, sampling_params: SamplingParams | None = None,
                 **options: Any) -> ChatRequest:
    """The request `LLM.chat`, `chat_stream` and their `AsyncLLM` twins were called with:
    ``messages`` itself when it is a :class:`ChatRequest` (then nothing else may be
    given), else one built from the keyword arguments: :class:`ChatRequest`'s fields, and
    any other keyword as a chat template variable."""
    if isinstance(messages, ChatRequest):
        if sampling_params is not None or options:
            given = ["sampling_params"] * (sampling_params is not None) + sorted(options)
            raise TypeError(f"a ChatRequest carries its own options: got {', '.join(given)} beside it")
        return messages
    known = {name: options.pop(name) for name in list(options) if name in _OPTIONS}
    template_kwargs = {**(known.pop("chat_template_kwargs", None) or {}), **options}
    return ChatRequest(messages, sampling_params, **known, chat_template_kwargs=template_kwargs)


def parse_tool_call_arguments(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with each assistant ``tool_calls[].function.arguments`` given as a JSON
    string (as OpenAI clients send them) parsed into an object, so that every chat template
    renders an object, as the model wrote it, not a quoted string it would learn to copy.
    A blank string is ``{}``; any other string that is not a JSON object is a ValueError
    naming the field."""
    out = []
    for i, message in enumerate(messages):
        calls = message.get("tool_calls")
        if not isinstance(calls, list) or not calls:
            out.append(message)
            continue
        out.append({**message, "tool_calls": [_parsed_call(call, f"messages[{i}].tool_calls[{j}]")
                                              for j, call in enumerate(calls)]})
    return out


def _parsed_call(call: Any, where: str) -> Any:
    function = call.get("function") if isinstance(call, Mapping) else None
    arguments = function.get("arguments") if isinstance(function, Mapping) else None
    if not isinstance(arguments, str):
        return call
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except ValueError as e:
        raise ValueError(f"{where}.function.arguments is not valid JSON ({e}): {arguments!r:.80}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{where}.function.arguments must be a JSON object, got {arguments!r:.80}")
    return {**call, "function": {**function, "arguments": parsed}}


def _messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of message dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must not be empty")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a message dict, got {type(message).__name__}: {message!r:.80}")
    return list(messages)


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of tool dicts, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ValueError(f"tools[{i}] must be a JSON-schema dict, got {type(tool).__name__}: {tool!r:.80}")
    return list(tools) or None


def tool_names(tools: list[dict[str, Any]] | None) -> frozenset[str]:
    """The names of the offered functions (OpenAI-style or bare function dicts)."""
    names = set()
    for tool in tools or []:
        function = tool.get("function") or tool
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return frozenset(names)


def _check_tool_choice(tool_choice: Any, tools: list[dict[str, Any]] | None) -> None:
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if not name:
            raise ValueError("tool_choice: a named choice needs {'type': 'function', 'function': {'name': ...}}")
        if name not in tool_names(tools):
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        return
    if tool_choice not in TOOL_CHOICES:
        raise ValueError(
            f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a named function, got {tool_choice!r}"
        )
    if tool_choice == "required" and not tools:
        raise ValueError("tool_choice 'required' needs tools")


def _check_response_format(response_format: Any) -> None:
    if response_format is None:
        return
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind not in RESPONSE_FORMATS:
        raise ValueError(f"response_format.type must be text, json_object or json_schema, got {kind!r}")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or spec.get("schema") is None:
            raise ValueError("response_format json_schema needs json_schema.schema")


def _template_kwargs(kwargs: Any) -> dict[str, Any]:
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"chat_template_kwargs must be a dict, got {type(kwargs).__name__}")
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(kwargs))
    if reserved:
        raise ValueError(f"chat_template_kwargs must not set {', '.join(reserved)}; use the request's own fields")
    return dict(kwargs)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
