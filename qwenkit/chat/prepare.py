"""A chat request made ready for the engine: the chat template, Qwen3's hybrid thinking
(on/off, the `/think` `/no_think` switch, a thinking budget), tool calls and structured
output.

`prepare_chat` renders the prompt and builds, per sequence, the control that steers it in
the engine and the parser that reads its output (:mod:`qwenkit.chat.stream` turns the
engine's updates back into deltas with those parsers).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qwenkit.chat.markers import SpecialIds
from qwenkit.chat.output_parser import OutputParser
from qwenkit.chat.thinking import (
    Phase,
    Role,
    ThinkingBudget,
    ThinkingState,
    close_thinking,
    early_stop_token_ids,
    effective_enable_thinking,
    initial_phase,
    resolve_thinking_mode,
)
from qwenkit.sampling import QWEN3_NON_THINKING, QWEN3_THINKING, SamplingDefaults, SamplingParams
from qwenkit.tokenizer import Tokenizer

TOOL_CHOICES = ("none", "auto", "required")


class ChatControl:
    """Steers one sequence in the engine: owns its :class:`ThinkingState` and advances it
    with every token; the thinking budget reads it, and so does the grammar, which applies
    only outside thinking (while the model may still open thinking, `<think>` stays
    allowed beside what the grammar allows)."""

    def __init__(self, thinking: ThinkingState, *, budget: ThinkingBudget | None, grammar: Any | None):
        self.thinking = thinking
        self.budget = budget
        self.grammar = grammar

    def allowed_mask(self) -> torch.Tensor | None:
        phase = self.thinking.phase
        if self.grammar is None or phase is Phase.THINKING:
            return None
        mask = self.grammar.allowed_mask()
        if phase is Phase.BEFORE_THINKING:
            mask = mask.clone()
            mask[self.thinking.ids.think_start] = True
        return mask

    def on_token(self, token_id: int) -> list[int]:
        self._advance(token_id)
        forced = self.budget.after_token() if self.budget else []
        for t in forced:
            self._advance(t)
        return forced

    def _advance(self, token_id: int) -> None:
        role = self.thinking.advance(token_id)
        if role is Role.ANSWER and self.grammar is not None and not self.grammar.is_terminated():
            self.grammar.accept(token_id)


@dataclass
class PreparedChat:
    prompt_token_ids: list[int]
    params: SamplingParams
    fallback: SamplingDefaults
    enable_thinking: bool
    controls: list[ChatControl]
    parsers: list[OutputParser]


def prepare_chat(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    sampling_params: SamplingParams | None,
    *,
    enable_thinking: bool = True,
    thinking_budget: int | None = None,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] = "auto",
    response_format: dict[str, Any] | None = None,
    parallel_tool_calls: bool = True,
    grammar_compiler: Any | None = None,
    **template_kwargs: Any,
) -> PreparedChat:
    """Render the prompt and build the per-sequence parsers and controls of a chat request."""
    if not messages:
        raise ValueError("messages must not be empty")
    if thinking_budget is not None and thinking_budget < 0:
        raise ValueError(f"thinking_budget must be >= 0, got {thinking_budget}")
    params = sampling_params or SamplingParams(max_tokens=None)
    tool_name = _tool_choice_name(tool_choice, tools)
    if tool_choice == "none":
        tools = None
    thinking = effective_enable_thinking(resolve_thinking_mode(messages, enable_thinking), thinking_budget)
    prompt = tokenizer.apply_chat_template(
        parse_tool_call_arguments(messages), tools=tools or None, add_generation_prompt=True,
        enable_thinking=thinking, **template_kwargs
    )
    ids = SpecialIds.from_tokenizer(tokenizer)
    prompt_ids = tokenizer.encode(prompt)
    if thinking_budget == 0 and ids.has_thinking:
        prompt_ids = close_thinking(prompt_ids, ids, tokenizer)
    phase = initial_phase(prompt_ids, ids)
    early_stop = early_stop_token_ids(tokenizer) if thinking_budget is not None and ids.has_thinking else None
    grammar = _grammar(grammar_compiler, response_format, tools, tool_choice, tool_name, parallel_tool_calls)
    # Calls written as JSON text count only when the answer itself is not asked to be JSON.
    json_answer = bool(response_format) and response_format.get("type") != "text"
    tool_names = frozenset() if json_answer else _tool_names(tools)
    controls, parsers = [], []
    for _ in range(params.n):
        state = ThinkingState(ids, phase)  # one per sequence: its control and its parser read it
        budget = ThinkingBudget(thinking_budget, state, early_stop) if early_stop is not None else None
        matcher = grammar.matcher() if grammar is not None else None
        controls.append(ChatControl(state, budget=budget, grammar=matcher))
        parsers.append(OutputParser(state, parse_tool_calls=bool(tools), tool_names=tool_names))
    return PreparedChat(
        prompt_ids, params, QWEN3_THINKING if thinking else QWEN3_NON_THINKING, thinking, controls, parsers
    )


def parse_tool_call_arguments(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with each assistant ``tool_calls[].function.arguments`` given as a JSON
    string (as OpenAI clients send them) parsed into an object, so that every chat template
    renders an object, as the model wrote it, not a quoted string it would learn to copy.
    A blank string is ``{}``; any other string that is not a JSON object is a ValueError
    naming the field."""
    out = []
    for i, message in enumerate(messages):
        calls = message.get("tool_calls") if isinstance(message, Mapping) else None
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


def _tool_names(tools: list[dict[str, Any]] | None) -> frozenset[str]:
    """The names of the offered functions (OpenAI-style or bare function dicts)."""
    names = set()
    for tool in tools or []:
        function = (tool.get("function") or tool) if isinstance(tool, Mapping) else None
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return frozenset(names)


def _tool_choice_name(tool_choice: str | dict[str, Any], tools: list[dict[str, Any]] | None) -> str | None:
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if not name:
            raise ValueError("tool_choice: a named choice needs {'type': 'function', 'function': {'name': ...}}")
        known = {(t.get("function") or t).get("name") for t in tools or []}
        if name not in known:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        return name
    if tool_choice not in TOOL_CHOICES:
        raise ValueError(
            f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a named function, got {tool_choice!r}"
        )
    if tool_choice == "required" and not tools:
        raise ValueError("tool_choice 'required' needs tools")
    return None


def _grammar(compiler, response_format, tools, tool_choice, tool_name, parallel):
    if tool_name is not None or tool_choice == "required":
        _require(compiler)
        return compiler.tool_calls(tools, name=tool_name, parallel=parallel)
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    _require(compiler)
    if kind == "json_object":
        return compiler.json_object()
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if "schema" in spec else None
        if schema is None:
            raise ValueError("response_format json_schema needs json_schema.schema")
        return compiler.json_schema(schema)
    raise ValueError(f"response_format.type must be text, json_object or json_schema, got {kind!r}")


def _require(compiler) -> None:
    if compiler is None:
        raise ValueError("structured output is not available for this model")
