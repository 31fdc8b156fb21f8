"""A chat request made ready for the engine: the chat template, Qwen3's hybrid thinking
(on/off, the `/think` `/no_think` switch, a thinking budget), tool calls and structured
output.

`prepare_chat` renders the prompt and builds, per sequence, the control that steers it in
the engine and the parser that reads its output (:mod:`qwenkit.chat.stream` turns the
engine's updates back into deltas with those parsers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qwenkit.chat.markers import SpecialIds
from qwenkit.chat.output_parser import OutputParser
from qwenkit.chat.request import ChatRequest, tool_names
from qwenkit.chat.thinking import (
    Phase,
    Role,
    ThinkingBudget,
    ThinkingState,
    close_thinking,
    early_stop_token_ids,
    initial_phase,
)
from qwenkit.sampling import QWEN3_NON_THINKING, QWEN3_THINKING, SamplingDefaults, SamplingParams
from qwenkit.tokenizer import Tokenizer


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
    """A chat request ready for `LLMEngine.add_request`: its prompt, its sampling (with the
    thinking or non-thinking defaults as fallback), and one control and one parser per
    sequence (the two share the sequence's thinking state)."""

    prompt_token_ids: list[int]
    params: SamplingParams
    fallback: SamplingDefaults
    enable_thinking: bool
    controls: list[ChatControl]
    parsers: list[OutputParser]
    # The prompt's images (qwenkit.multimodal.MultimodalPrompt), when it has any.
    multimodal: Any = None


def prepare_chat(tokenizer: Tokenizer, request: ChatRequest, *, grammar_compiler: Any | None = None) -> PreparedChat:
    """Render the prompt and build the per-sequence parsers and controls of ``request``.
    ``grammar_compiler`` (a `GrammarCompiler`) is needed when ``request.needs_grammar``."""
    params = request.sampling_params or SamplingParams(max_tokens=None)
    tools = request.offered_tools
    thinking = request.thinking
    prompt = tokenizer.apply_chat_template(request.messages, tools=tools, add_generation_prompt=True,
                                           enable_thinking=thinking, **request.chat_template_kwargs)
    ids = SpecialIds.from_tokenizer(tokenizer)
    prompt_ids = tokenizer.encode(prompt)
    budget = request.thinking_budget if ids.has_thinking else None
    if budget == 0:
        prompt_ids = close_thinking(prompt_ids, ids, tokenizer)
    phase = initial_phase(prompt_ids, ids)
    early_stop = early_stop_token_ids(tokenizer) if budget is not None else None
    grammar = _grammar(grammar_compiler, request) if request.needs_grammar else None
    # Calls written as JSON text count only when the answer itself is not asked to be JSON.
    text_tool_names = frozenset() if request.answer_is_json else tool_names(tools)
    controls, parsers = [], []
    for _ in range(params.n):
        state = ThinkingState(ids, phase)  # one per sequence: its control and its parser read it
        thinking_budget = ThinkingBudget(budget, state, early_stop) if budget is not None else None
        matcher = grammar.matcher() if grammar is not None else None
        controls.append(ChatControl(state, budget=thinking_budget, grammar=matcher))
        parsers.append(OutputParser(state, parse_tool_calls=bool(tools), tool_names=text_tool_names))
    return PreparedChat(
        prompt_ids, params, QWEN3_THINKING if thinking else QWEN3_NON_THINKING, thinking, controls, parsers
    )


def _grammar(compiler: Any | None, request: ChatRequest) -> Any:
    if compiler is None:
        raise ValueError("structured output is not available for this model")
    if request.named_tool is not None or request.tool_choice == "required":
        return compiler.tool_calls(request.tools, name=request.named_tool, parallel=request.parallel_tool_calls)
    if request.response_format["type"] == "json_object":
        return compiler.json_object()
    return compiler.json_schema(request.response_format["json_schema"]["schema"])
