"""Errors a handler raises, rendered in the shape of the route's protocol.

One exception type for every client error; `openai_error` and `dashscope_error` turn it
into OpenAI's ``{"error": {...}}`` or DashScope's ``{"code", "message", "request_id"}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# OpenAI's error `type` and DashScope's `code` for each status this server answers with.
_OPENAI_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
    413: "invalid_request_error", 429: "rate_limit_exceeded", 503: "server_error", 504: "server_error",
}
_DASHSCOPE_CODES = {
    400: "InvalidParameter", 401: "InvalidApiKey", 404: "ModelNotFound", 413: "RequestTooLarge",
    429: "Throttling", 503: "ServiceUnavailable", 504: "RequestTimeOut",
}
_PARAM = re.compile(r"^(?:the )?([a-z_][a-z0-9_.\[\]]*)\b")


@dataclass
class APIError(Exception):
    """A request the server refuses; ``status`` is the HTTP status."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def __str__(self) -> str:
        return self.message


def bad_request(error: Exception, known_params: frozenset[str] = frozenset()) -> APIError:
    """A 400 from an engine ValueError; its message starts with the field at fault
    (``top_p must be in (0, 1]``), which becomes ``param`` when it is a request field."""
    message = " ".join(str(error).split()) or type(error).__name__
    match = _PARAM.match(message)
    param = match.group(1) if match and match.group(1) in known_params else None
    code = "context_length_exceeded" if type(error).__name__ == "ContextLengthError" else None
    return APIError(400, message, param=param, code=code)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for pydantic's validation errors, naming the field at fault."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg', '')}", None
    # pydantic names the union member that failed ("str", "list[...]", "function-after[...]"): drop it.
    if not loc and first.get("type") == "missing":
        return "the request body is required (a JSON object)", None
    if not loc and first.get("type") in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object (send it with Content-Type: application/json)", None
    param = ".".join(p for p in loc if not (p.startswith(("list[", "function-")) or p in ("str", "int", "float")))
    message = first.get("msg", "invalid value")
    if param:
        message = f"{param}: {message}"
    if first.get("type") == "missing" and param:
        message = f"{param} is required"
    extra = len(errors) - 1
    if extra:
        message += f" (and {extra} more error{'s' if extra > 1 else ''})"
    return message, param or None


def openai_error(error: APIError) -> dict[str, Any]:
    return {"error": {
        "message": error.message,
        "type": _OPENAI_TYPES.get(error.status, "server_error" if error.status >= 500 else "invalid_request_error"),
        "param": error.param,
        "code": error.code,
    }}


def dashscope_error(error: APIError, request_id: str) -> dict[str, Any]:
    return {
        "code": _DASHSCOPE_CODES.get(error.status, "InternalError" if error.status >= 500 else "InvalidParameter"),
        "message": error.message,
        "request_id": request_id,
    }
