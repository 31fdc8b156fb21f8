"""Tools from typed Python functions.

    @tool
    def get_weather(city: str, unit: Literal["C", "F"] = "C") -> dict:
        '''Current weather of a city.'''

The docstring's first paragraph is the description; the type hints become a JSON
schema through pydantic. A call's arguments are validated by the same model, and any
exception (bad arguments included) becomes the tool's result text, for the model to read.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic_core import to_jsonable_python

__all__ = ["Tool", "run_tool_call", "arun_tool_call", "tool"]


class Tool:
    """A function the model may call: `name`, `description`, `parameters` (JSON schema)."""

    def __init__(self, fn: Callable[..., Any], *, name: str | None = None, description: str | None = None):
        self.fn = fn
        self.name = name or fn.__name__
        doc = inspect.getdoc(fn) or ""
        self.description = description if description is not None else doc.split("\n\n")[0].strip()
        self.arguments_model = _arguments_model(fn, self.name)
        schema = self.arguments_model.model_json_schema()
        schema.pop("title", None)
        self.parameters = schema

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"

    def schema(self) -> dict[str, Any]:
        """The OpenAI function-tool schema."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def invoke(self, arguments: str | dict[str, Any] | None) -> str:
        """Run on the model's JSON arguments; the result (or the error) as text."""
        try:
            if isinstance(arguments, str):
                arguments = json.loads(arguments) if arguments.strip() else {}
            validated = self.arguments_model.model_validate(arguments or {})
            result = self.fn(**{name: getattr(validated, name) for name in type(validated).model_fields})
        except ValidationError as e:
            return f"Error: invalid arguments for {self.name}: {e.errors(include_url=False)}"
        except Exception as e:  # noqa: BLE001 - the model reads the failure and may retry
            return f"Error: {type(e).__name__}: {e}"
        return _as_text(result)

    async def ainvoke(self, arguments: str | dict[str, Any] | None) -> str:
        """`invoke` for coroutine functions too (sync functions run on a worker thread)."""
        if not inspect.iscoroutinefunction(self.fn):
            import asyncio

            return await asyncio.to_thread(self.invoke, arguments)
        try:
            if isinstance(arguments, str):
                arguments = json.loads(arguments) if arguments.strip() else {}
            validated = self.arguments_model.model_validate(arguments or {})
            result = await self.fn(**{name: getattr(validated, name) for name in type(validated).model_fields})
        except ValidationError as e:
            return f"Error: invalid arguments for {self.name}: {e.errors(include_url=False)}"
        except Exception as e:  # noqa: BLE001
            return f"Error: {type(e).__name__}: {e}"
        return _as_text(result)


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None):
    """Make a typed function a `Tool`: ``@tool`` or ``@tool(name=..., description=...)``."""
    if fn is None:
        return lambda f: Tool(f, name=name, description=description)
    return Tool(fn, name=name, description=description)


def _arguments_model(fn: Callable[..., Any], name: str) -> type[BaseModel]:
    hints = get_type_hints(fn, include_extras=True)
    fields: dict[str, Any] = {}
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {name}: *args / **kwargs cannot be described to a model")
        annotation = hints.get(param.name, Any)
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (annotation, default)
    return create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)


def _as_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    return json.dumps(to_jsonable_python(result), ensure_ascii=False)


def run_tool_call(tools: dict[str, Tool], call: Any) -> dict[str, Any]:
    """Run one `ToolCall` with the tool of its name; the tool message that answers it.
    A failure (an unknown tool included) is the message's content, ``"Error: ..."``."""
    tool = tools.get(call.name)
    content = tool.invoke(call.arguments) if tool else f"Error: no tool named {call.name!r}"
    return {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": content}


async def arun_tool_call(tools: dict[str, Tool], call: Any) -> dict[str, Any]:
    """`run_tool_call` for asyncio."""
    tool = tools.get(call.name)
    content = await tool.ainvoke(call.arguments) if tool else f"Error: no tool named {call.name!r}"
    return {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": content}


def as_tools(items: list[Any]) -> list[Tool]:
    """Tools from `Tool`s and plain functions (decorated on the fly)."""
    return [item if isinstance(item, Tool) else Tool(item) for item in items]
