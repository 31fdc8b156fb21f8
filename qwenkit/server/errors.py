"""Errors a handler raises, rendered in the shape of the route's protocol.

One exception type for every client error; `openai_error` and `dashscope_error` turn it
into OpenAI's ``{"error": {...}}`` or DashScope's ``{"code", "message", "request_id"}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# OpenAI's error `type` and DashScope's `code` for each status this server answers with.
_OPENAI_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
    404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
    421: "invalid_request_error", 429: "rate_limit_exceeded", 503: "server_error", 504: "server_error",
}
_DASHSCOPE_CODES = {
    400: "InvalidParameter", 401: "InvalidApiKey", 403: "AccessDenied", 404: "NotFound",
    405: "MethodNotAllowed", 413: "RequestTooLarge", 421: "InvalidHost", 429: "Throttling",
    503: "ServiceUnavailable", 504: "RequestTimeOut",
}
# ...and for the errors whose own `code` says more than their status.
_DASHSCOPE_CODES_BY_CODE = {"model_not_found": "ModelNotFound", "unknown_route": "InvalidURL"}
_PARAM = re.compile(r"^(?:the )?([a-z_][a-z0-9_.\[\]]*)\b")


@dataclass
class APIError(Exception):
    """A request the server refuses; ``status`` is the HTTP status."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def __post_init__(self) -> None:
        # A message may quote the request ("the model `\ud800`..."): it must still encode.
        self.message = printable(self.message)
        self.param = None if self.param is None else printable(self.param)

    def __str__(self) -> str:
        return self.message


def printable(text: str) -> str:
    """`text` with what UTF-8 cannot hold (JSON's lone surrogates) written as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def unparsable_body_message(body: bytes) -> str:
    """Why a request body that FastAPI could not parse is refused (a 400)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"the request body is not UTF-8 (byte {e.start} is {body[e.start:e.start + 1]!r}): send JSON as UTF-8"
    try:
        json.loads(text)
    except RecursionError:
        return "the request body nests JSON too deeply (objects and arrays more than a few hundred levels deep)"
    except ValueError as e:
        return f"the request body is not valid JSON: {e}"
    return "the request body cannot be read as JSON"


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
        reason = (first.get("ctx") or {}).get("error") or first.get("msg", "")
        where = f" at character {loc[0]}" if loc else ""
        return f"the request body is not valid JSON: {reason}{where}", None
    if not loc and first.get("type") == "missing":
        return "the request body is required (a JSON object)", None
    if not loc and first.get("type") in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object (send it with Content-Type: application/json)", None
    # A value that fits no member of a union fails once per member: report the member it
    # got furthest into (`prompt.0` for a list that holds a bool).
    chosen = max(errors, key=lambda e: len(_field_path(e)))
    path = _field_path(chosen)
    param = ".".join(path)
    message = chosen.get("msg", "invalid value")
    if chosen.get("type") == "string_unicode":
        message = "the text is not valid Unicode (it holds a lone surrogate)"
    if chosen.get("type") == "missing" and param:
        message = f"{param} is required"
    elif param:
        message = f"{param}: {message}"
    extra = len(errors) - 1
    if extra:
        message += f" (and {extra} more error{'s' if extra > 1 else ''})"
    return message, param or None


def _field_path(error: dict[str, Any]) -> list[str]:
    """An error's location without "body" and without the names pydantic gives union members
    ("str", "list[int]", "constrained-str", "literal['auto']", a model's class name)."""
    return [str(p) for p in error.get("loc", ()) if p != "body" and not _UNION_TAG.match(str(p))]


_UNION_TAG = re.compile(r"^(?:str|int|float|bool|[A-Z][A-Za-z]+|[a-z-]+\[.*\]|[a-z]+-[a-z-]+)$")


def openai_error(error: APIError) -> dict[str, Any]:
    return {"error": {
        "message": error.message,
        "type": _OPENAI_TYPES.get(error.status, "server_error" if error.status >= 500 else "invalid_request_error"),
        "param": error.param,
        "code": error.code,
    }}


def dashscope_error(error: APIError, request_id: str) -> dict[str, Any]:
    return {
        "code": _DASHSCOPE_CODES_BY_CODE.get(error.code) or _DASHSCOPE_CODES.get(
            error.status, "InternalError" if error.status >= 500 else "InvalidParameter"),
        "message": error.message,
        "request_id": request_id,
    }
