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

Embedding and reranking (qwenkit/embedding.py) are read from the checkpoint too:

* embedding: the folder holds sentence-transformers' last-token pooling config
  (``modules.json`` naming a Pooling folder whose config says ``pooling_mode_lasttoken``,
  as Qwen3-Embedding ships), or a GGUF file's ``{arch}.pooling_type`` says LAST (as
  llama.cpp's conversions of Qwen3-Embedding do: their tied weights look like a chat model's),
  or the weights have no lm_head. Such a model does not chat. The GGUF key is read as the
  file loads; `qwenkit show` and `list`, which do not parse a GGUF's header (seconds for a
  large vocabulary), do not list a GGUF as an embedding model.
* rerank: a Qwen3-Reranker. Its config.json is a plain ``Qwen3ForCausalLM``, its template
  Qwen3's: what sets it apart is what it is published as, so it is recognised by its name
  (the folder, file or Hub repo names "Reranker", as Qwen/Qwen3-Reranker-0.6B and its GGUF
  conversions do) or by sentence-transformers' cross-encoder config
  (``config_sentence_transformers.json`` saying ``"model_type": "CrossEncoder"``). Any other
  model reranks only when asked to (``LLM(task="rerank")``, ``qwenkit serve --task rerank``):
  a chat model whose vocabulary happens to hold "yes" and "no" is not listed as a reranker.
* ``task`` overrides what is read: "generate" (a chat model, nothing else), "embed", "rerank".

Plain Python, no torch: `qwenkit show` and `list` call it without loading weights.
"""

from __future__ import annotations

import dataclasses

import json
from dataclasses import dataclass
from pathlib import Path
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
    embedding: bool = False  # an embedding model (it does not generate)
    rerank: bool = False
    vision: bool = False  # it reads images (a vision-language checkpoint)

    def names(self) -> list[str]:
        """As Ollama lists capabilities ("completion", "thinking", "tools", "embedding"),
        with "hybrid_thinking" for models whose thinking can be switched off and "rerank"."""
        if self.embedding:
            return ["embedding"]
        names = ["completion"]
        if self.thinking:
            names.append("thinking")
        if self.hybrid_thinking:
            names.append("hybrid_thinking")
        if self.tools:
            names.append("tools")
        if self.rerank:
            names.append("rerank")
        if self.vision:
            names.append("vision")
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


TASKS = ("generate", "embed", "rerank")


def model_capabilities(llm: Any) -> Capabilities:
    """A loaded `LLM`'s capabilities: its tokenizer's, and whether it embeds or reranks
    (read from its checkpoint, or as its `task` says)."""
    caps = checkpoint_capabilities(detect_capabilities(llm.tokenizer), getattr(llm, "files", None),
                                   task=getattr(llm, "task", None), headless=getattr(llm.model, "is_headless", False),
                                   pooling=getattr(llm, "pooling", None))
    config = getattr(llm, "config", None)
    if getattr(config, "is_vision", False) and not caps.embedding:
        caps = dataclasses.replace(caps, vision=True)
    return caps


def checkpoint_capabilities(caps: Capabilities, files: Any, *, task: str | None = None,
                            headless: bool = False, pooling: str | None = None) -> Capabilities:
    """`caps` (the tokenizer's) with embedding / rerank as the checkpoint's `files` (a
    `ModelFiles`, or None) or `task` say; `headless`: the weights have no lm_head; `pooling`:
    a loaded GGUF's pooling_type ("last": an embedding model)."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    hf = files is not None and files.format == "hf"
    if task is None:
        embedding = headless or pooling == "last" or (hf and declares_last_token_pooling(files.path))
    else:
        embedding = task == "embed"
    if embedding:
        return Capabilities(thinking=False, hybrid_thinking=False, tools=False, embedding=True)
    rerank = is_published_reranker(files) if task is None else task == "rerank"
    return Capabilities(caps.thinking, caps.hybrid_thinking, caps.tools, rerank=rerank, vision=caps.vision)


def is_published_reranker(files: Any) -> bool:
    """Whether a checkpoint is published as a reranker: its names (folder or file, Hub repo)
    say "Reranker", or its folder holds sentence-transformers' cross-encoder config."""
    if files is None:
        return False
    path = Path(files.path)
    names = [files.name, path.name, path.stem, *(p for p in path.parts if p.startswith("models--"))]
    if any("reranker" in n.lower() for n in names):
        return True
    try:
        config = json.loads((path / "config_sentence_transformers.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "CrossEncoder"


def declares_last_token_pooling(path: Path) -> bool:
    """Whether a checkpoint folder says it is an embedding model with last-token pooling."""
    try:
        modules = json.loads((path / "modules.json").read_text())
        pooling = next(m for m in modules if m.get("type", "").endswith("models.Pooling"))
        config = json.loads((path / pooling.get("path", "") / "config.json").read_text())
    except (OSError, ValueError, StopIteration, AttributeError):
        return False
    return bool(config.get("pooling_mode_lasttoken"))


def _render(tokenizer: _Tokenizer, **kwargs: Any) -> str | None:
    try:
        return tokenizer.apply_chat_template(_PROBE, add_generation_prompt=True, **kwargs)
    except Exception:  # noqa: BLE001 - a template that refuses the probe shows no such capability
        return None


def _ends_inside_thinking(prompt: str) -> bool:
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)
