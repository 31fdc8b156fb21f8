"""What a loaded model can do: think, switch its thinking off, call tools.

Read from the checkpoint, never from its name: the vocabulary must hold the marker
tokens (`<think>` `</think>`, `<tool_call>` `</tool_call>`), and the chat template must
use them. The template is asked by rendering a one-message chat:

* Qwen3's hybrid template renders a different generation prompt for
  ``enable_thinking=False`` (an empty `<think></think>`): thinking, switchable.
* QwQ's and the Qwen3 *-Thinking* templates end the prompt inside `<think>`, whatever
  ``enable_thinking`` says: thinking, always on (a thinking budget still caps it).
* Qwen2.5 (no think tokens) and the Qwen3 *-Instruct-2507* templates (think tokens, but
  a template that never opens thinking): no thinking; ``enable_thinking`` and a thinking
  budget change nothing.
* Tools: the template renders a tool's schema into the prompt.

Plain Python, no torch: `qwenkit show` and `list` call it without loading weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"

_PROBE = [{"role": "user", "content": "hi"}]
_PROBE_TOOL = {"type": "function", "function": {
    "name": "qwenkit_probe_tool", "description": "probe", "parameters": {"type": "object", "properties": {}}}}


class _Tokenizer(Protocol):
    def token_to_id(self, token: str) -> int | None: ...

    def apply_chat_template(self, messages: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Capabilities:
    """thinking: the model writes reasoning in `<think>` before answering. hybrid_thinking:
    ``enable_thinking`` (and ``/think`` ``/no_think``) turn it on and off, as in Qwen3;
    without it a thinking model always thinks. tools: it knows OpenAI-style tool calls."""

    thinking: bool
    hybrid_thinking: bool
    tools: bool

    def names(self) -> list[str]:
        """As Ollama lists capabilities ("completion", "thinking", "tools"), with
        "hybrid_thinking" for models whose thinking can be switched off."""
        names = ["completion"]
        if self.thinking:
            names.append("thinking")
        if self.hybrid_thinking:
            names.append("hybrid_thinking")
        if self.tools:
            names.append("tools")
        return names

    def thinking_note(self, model: str, *, no_think: bool = False, budget: bool = False) -> str | None:
        """Why thinking options have no effect on this model, or None when they do."""
        if not self.thinking and (no_think or budget):
            return f"{model} cannot think: thinking options (--no-think, --thinking-budget, /think) have no effect"
        if self.thinking and not self.hybrid_thinking and no_think:
            return f"{model} always thinks: --no-think has no effect (--thinking-budget caps its thinking)"
        return None


def detect_capabilities(tokenizer: _Tokenizer) -> Capabilities:
    """A model's capabilities, from its tokenizer's vocabulary and chat template."""
    has_think_tokens = all(tokenizer.token_to_id(t) is not None for t in (THINK_START, THINK_END))
    has_tool_tokens = all(tokenizer.token_to_id(t) is not None for t in (TOOL_CALL_START, TOOL_CALL_END))
    thinking = hybrid = tools = False
    if has_think_tokens:
        on = _render(tokenizer, enable_thinking=True)
        off = _render(tokenizer, enable_thinking=False)
        hybrid = on is not None and off is not None and on != off and THINK_END in off.removeprefix(on)
        always = on is not None and _ends_inside_thinking(on)
        thinking = hybrid or always
        hybrid = hybrid and not always
    if has_tool_tokens:
        plain = _render(tokenizer)
        with_tool = _render(tokenizer, tools=[_PROBE_TOOL])
        tools = with_tool is not None and with_tool != plain and "qwenkit_probe_tool" in with_tool
    return Capabilities(thinking=thinking, hybrid_thinking=hybrid, tools=tools)


def _render(tokenizer: _Tokenizer, **kwargs: Any) -> str | None:
    try:
        return tokenizer.apply_chat_template(_PROBE, add_generation_prompt=True, **kwargs)
    except Exception:  # noqa: BLE001 - a template that refuses the probe shows no such capability
        return None


def _ends_inside_thinking(prompt: str) -> bool:
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)
