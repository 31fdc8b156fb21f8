"""Chat templates: Jinja rendered exactly as Hugging Face transformers renders them.

A checkpoint's chat template is a Jinja program written against transformers' sandbox
(``trim_blocks``, ``lstrip_blocks``, loop controls, a ``tojson`` that keeps non-ASCII
text, ``raise_exception``, ``strftime_now``). :class:`ChatTemplate` builds the same
environment so that a prompt renders byte for byte as transformers would render it.
Plain Python, no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwenkit.errors import QwenkitError

# The names a message's reasoning arrives under; templates read the first (transformers
# also copies it to "thinking", which gpt-oss templates read).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@functools.cache
def qwen3_template() -> str:
    """The official Qwen3 chat template, for checkpoints that ship none (e.g. some GGUFs)."""
    return (importlib.resources.files("qwenkit") / "templates" / "qwen3.jinja").read_text(encoding="utf-8")


class ChatTemplate:
    """A chat template compiled once, rendered per request.

    >>> ChatTemplate(qwen3_template()).render([{"role": "user", "content": "hi"}])
    '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'
    """

    def __init__(self, source: str):
        self.source = source
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise QwenkitError(f"chat template does not compile: {_one_line(e)}") from e

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render a conversation to prompt text.

        ``tools`` are JSON schemas, either bare ``{"name", "description", "parameters"}`` or
        OpenAI-style ``{"type": "function", "function": {...}}``; both are passed to the
        template as given. ``enable_thinking`` reaches the template only when set, so that
        templates testing ``enable_thinking is defined`` see what transformers shows them.
        Extra keyword arguments become template variables.
        """
        for message in messages:
            if not isinstance(message, Mapping):
                raise QwenkitError(f"chat messages must be dicts, got {type(message).__name__}: {message!r:.80}")
        for tool in tools or ():
            if not isinstance(tool, Mapping):
                raise QwenkitError(f"tools must be JSON-schema dicts, got {type(tool).__name__}: {tool!r:.80}")
        if enable_thinking is not None:
            template_kwargs["enable_thinking"] = enable_thinking
        template_kwargs.setdefault("documents", None)  # transformers always defines it
        # OpenAI clients send `"content": null` beside tool calls; templates expect the key absent.
        messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
        try:
            return self._template.render(
                messages=_alias_reasoning_fields(_plain_data(messages)),
                tools=_plain_data(list(tools)) if tools else None,
                add_generation_prompt=add_generation_prompt,
                **_plain_data(template_kwargs),
            )
        except _TemplateRaised as e:
            raise QwenkitError(f"chat template rejected the conversation: {_one_line(e)}") from e
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            # Templates are programs over user input: a missing field or a None where a
            # string belongs surfaces here, and is the input's fault rather than ours.
            raise QwenkitError(f"chat template failed: {type(e).__name__}: {_one_line(e)}") from e


class _TemplateRaised(jinja2.TemplateError):
    """A template's own ``raise_exception(message)``."""


def _raise_exception(message: str):
    raise _TemplateRaised(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's built-in filter escapes HTML characters and sorts keys; transformers' does neither.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict(...)`` and ``dict.fromkeys(...)`` without exposing the ``dict`` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` that refuses underscore-prefixed names (a sandbox escape route)."""

    def __init__(*args, **kwargs):  # Jinja's signature trick, so `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant spans with it
    for training masks; for inference the body renders unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _alias_reasoning_fields(messages: list[dict]) -> list[dict]:
    aliased = []
    for message in messages:
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


def _plain_data(value: Any) -> Any:
    """A copy made of JSON types only: the sandbox then sees no object with methods of its
    own, and the template can never touch the caller's messages."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses such as str enums
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_data(key): _plain_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain_data(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain_data(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain_data(value.model_dump())
    if callable(getattr(value, "item", None)) and getattr(value, "shape", None) == ():  # numpy / torch scalars
        return _plain_data(value.item())
    return f"<{type(value).__name__}>"


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__
