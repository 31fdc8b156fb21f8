"""The server's published `/openapi.json`, made to say what the server does.

FastAPI's own document lists a 422 the server never sends, none of the errors it does
send, `{}` for every answer and JSON for /metrics. `install_openapi` replaces it with one
built from the same routes, then: the response models below for each route's 200, the
error responses each route can send in its protocol's shape (which depend on the
server's config: 401 only with a key...), text/event-stream for streams and text/plain
for /metrics. The request schemas are the pydantic models' own, which are strict (see
openai_protocol.py), so what the document allows is what the validation allows.
`benchmarks/fuzz_server.sh` checks the server against it with schemathesis.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from qwenkit.server.limits import OPEN_PATHS, is_dashscope_path
from qwenkit.server.openai_protocol import ModelCard, ModelList
from qwenkit.server.conversations_protocol import ConversationDeletedResource, ConversationObject
from qwenkit.server.responses_protocol import InputTokens, ItemList, ResponseDeleted
from qwenkit.server.responses_protocol import Response as ResponsesResponse
from qwenkit.server.web.conversations import StoredMessage

# -- response models (documentation: the handlers build plain dicts) ------------------------


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpenAIErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(_Out):
    error: OpenAIErrorDetail


class DashScopeError(_Out):
    code: str
    message: str
    request_id: str = Field(min_length=1)


class PromptTokensDetails(_Out):
    cached_tokens: int


class CompletionTokensDetails(_Out):
    reasoning_tokens: int


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class FunctionCall(_Out):
    name: str | None
    arguments: str


class ToolCall(_Out):
    model_config = ConfigDict(extra="allow")  # DashScope adds index
    id: str | None
    type: Literal["function"]
    function: FunctionCall


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[TokenLogprob]


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None
    reasoning: str | None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None  # for a request with the legacy functions


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls", "function_call", "abort"]


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class Completion(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class DashScopeMessage(_Out):
    role: Literal["assistant"]
    content: str
    reasoning_content: str
    tool_calls: list[ToolCall] | None = None


class DashScopeChoice(_Out):
    index: int
    finish_reason: str
    message: DashScopeMessage
    logprobs: ChatLogprobs | None = None


class DashScopeChoices(_Out):
    choices: list[DashScopeChoice]


class DashScopeText(_Out):
    text: str
    finish_reason: str


class DashScopeUsage(_Out):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    output_tokens_details: CompletionTokensDetails
    prompt_tokens_details: PromptTokensDetails


class Generation(_Out):
    output: DashScopeText | DashScopeChoices
    usage: DashScopeUsage
    request_id: str


class Health(_Out):
    status: Literal["ok"]
    model: str


class Conversation(_Out):
    id: str
    object: Literal["conversation"]
    title: str | None
    created_at: int
    updated_at: int


class ConversationWithMessages(Conversation):
    messages: list[StoredMessage]


class ConversationList(_Out):
    object: Literal["list"]
    data: list[Conversation]


class ConversationDeleted(_Out):
    id: str
    object: Literal["conversation.deleted"]
    deleted: Literal[True]


class ToolList(_Out):
    object: Literal["list"]
    data: list[dict[str, Any]]
    error: str | None


class ToolResult(_Out):
    name: str
    content: str


# Before OpenAPI 3.2's itemSchema, an event stream's `schema` describes each event: its
# fields as server-sent events have them (`data` a JSON text, `event` its name, if any).
_EVENT_STREAM = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer"}}}}}
_GENERATION_ROUTES = frozenset({
    "/v1/chat/completions", "/compatible-mode/v1/chat/completions", "/v1/completions",
    "/api/v1/services/aigc/text-generation/generation", "/v1/responses",
})
# (path, method) -> (200 model, the status if not 200, extra media types)
_ANSWERS: dict[tuple[str, str], tuple[type[BaseModel] | None, int, dict[str, Any]]] = {
    ("/v1/chat/completions", "post"): (ChatCompletion, 200, _EVENT_STREAM),
    ("/compatible-mode/v1/chat/completions", "post"): (ChatCompletion, 200, _EVENT_STREAM),
    ("/v1/completions", "post"): (Completion, 200, _EVENT_STREAM),
    ("/api/v1/services/aigc/text-generation/generation", "post"): (Generation, 200, _EVENT_STREAM),
    ("/v1/models", "get"): (ModelList, 200, {}),
    ("/compatible-mode/v1/models", "get"): (ModelList, 200, {}),
    ("/v1/models/{model_id}", "get"): (ModelCard, 200, {}),
    ("/compatible-mode/v1/models/{model_id}", "get"): (ModelCard, 200, {}),
    ("/v1/responses", "post"): (ResponsesResponse, 200, _EVENT_STREAM),
    ("/v1/responses/{response_id}", "get"): (ResponsesResponse, 200, {}),
    ("/v1/responses/{response_id}", "delete"): (ResponseDeleted, 200, {}),
    ("/v1/responses/{response_id}/input_items", "get"): (ItemList, 200, {}),
    ("/v1/responses/{response_id}/cancel", "post"): (ResponsesResponse, 200, {}),
    ("/v1/responses/input_tokens", "post"): (InputTokens, 200, {}),
    ("/v1/conversations", "post"): (ConversationObject, 200, {}),
    ("/v1/conversations/{conversation_id}", "get"): (ConversationObject, 200, {}),
    ("/v1/conversations/{conversation_id}", "post"): (ConversationObject, 200, {}),
    ("/v1/conversations/{conversation_id}", "delete"): (ConversationDeletedResource, 200, {}),
    ("/v1/conversations/{conversation_id}/items", "post"): (ItemList, 200, {}),
    ("/v1/conversations/{conversation_id}/items", "get"): (ItemList, 200, {}),
    ("/v1/conversations/{conversation_id}/items/{item_id}", "get"): (None, 200, {
        "application/json": {"schema": {"type": "object", "description": "the item"}}}),
    ("/v1/conversations/{conversation_id}/items/{item_id}", "delete"): (ConversationObject, 200, {}),
    ("/health", "get"): (Health, 200, {}),
    ("/metrics", "get"): (None, 200, {"text/plain": {"schema": {"type": "string"}}}),
    ("/web/api/conversations", "get"): (ConversationList, 200, {}),
    ("/web/api/conversations", "post"): (Conversation, 201, {}),
    ("/web/api/conversations/{conversation_id}", "get"): (ConversationWithMessages, 200, {}),
    ("/web/api/conversations/{conversation_id}", "patch"): (Conversation, 200, {}),
    ("/web/api/conversations/{conversation_id}", "delete"): (ConversationDeleted, 200, {}),
    ("/web/api/conversations/{conversation_id}/messages", "post"): (Conversation, 200, {}),
    ("/web/api/tools", "get"): (ToolList, 200, {}),
    ("/web/api/tools/{name}", "post"): (ToolResult, 200, {}),
}
_WRITES = frozenset({"post", "put", "patch", "delete"})
_REASONS = {
    400: "Bad request: the message names the field at fault",
    401: "Missing or wrong API key",
    403: "A write from a page on another web origin",
    404: "Unknown model, stored response, conversation, item or tool",
    413: "Request body larger than the server's limit",
    421: "A Host header this server does not answer to (DNS-rebinding guard)",
    429: "Too many requests waiting; retry after Retry-After seconds",
    503: "The conversation store cannot be opened",
    504: "The generation ran past the server's request timeout",
}


def install_openapi(app, config) -> None:
    """Make `app.openapi()` (served at /openapi.json) build the document described above."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, config)
        return app.openapi_schema

    app.openapi = openapi


def build_openapi(app, config) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    refs = _add_models(components, [OpenAIError, DashScopeError] + [m for m, _, _ in _ANSWERS.values() if m])
    if config.api_key:
        doc["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    for path, operations in doc.get("paths", {}).items():
        for method, operation in operations.items():
            _document(operation, path, method, config, refs)
    return doc


def _add_models(components: dict[str, Any], models: list[type[BaseModel]]) -> dict[type[BaseModel], dict]:
    refs = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        refs[model] = {"$ref": f"#/components/schemas/{model.__name__}"}
    return refs


def _document(operation: dict[str, Any], path: str, method: str, config, refs) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)
    model, status, extra = _ANSWERS.get((path, method), (None, 200, {}))
    if (path, method) in _ANSWERS:
        content = {"application/json": {"schema": refs[model]}} if model else {}
        responses.pop("200", None)
        responses[str(status)] = {"description": "Success", "content": {**content, **extra}}
    protected = bool(config.api_key) and path not in OPEN_PATHS
    statuses = {421}
    if protected:
        statuses.add(401)
        operation["security"] = [{"apiKey": []}]
    if method in _WRITES:
        statuses.add(413)
        if not config.api_key or path.startswith("/web/"):
            statuses.add(403)
    queried = any(parameter.get("in") == "query" for parameter in operation.get("parameters", []))
    if "requestBody" in operation or queried or path.endswith("/cancel"):  # cancel: nothing runs in the background
        statuses.add(400)
    if path in _GENERATION_ROUTES:
        statuses |= {404, 429} | ({504} if config.request_timeout_s is not None else set())
    if path.startswith("/web/api/conversations"):
        statuses.add(503)
    if (path.startswith(("/web/api/", "/v1/responses/", "/v1/conversations/")) and "{" in path) \
            or path == "/v1/responses/input_tokens":
        statuses.add(404)  # a stored response, conversation or item; a model; previous_response_id
    error = refs[DashScopeError if is_dashscope_path(path) else OpenAIError]
    for code in sorted(statuses):
        response: dict[str, Any] = {"description": _REASONS[code], "content": {"application/json": {"schema": error}}}
        if code == 429:
            response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "required": True}}
        responses[str(code)] = response
