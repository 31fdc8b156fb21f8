"""The ASGI app: one router per protocol over `AsyncLLM`, errors in each protocol's shape.

`create_app` builds the shared `ServerContext` (engine, served names, request slots,
metrics), includes the routers (OpenAI, Responses, DashScope, operations; the web page's
when it is on), answers every error as its route's protocol writes errors, and wraps the
app in the API-key / body-size guard, the Host / Origin checks and the request watch (a
client that leaves cancels its request; refusals are logged). The handlers live in
:mod:`qwenkit.server.routes`; they translate with the protocol modules and answer through
:func:`qwenkit.server.respond.respond`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from qwenkit.server.config import ServerConfig
from qwenkit.server.errors import APIError, dashscope_error, openai_error, unparsable_body_message, validation_message
from qwenkit.server.limits import Guard, is_dashscope_path, route_table
from qwenkit.server.openapi import install_openapi
from qwenkit.server.routes.context import ServerContext
from qwenkit.server.routes.dashscope_api import dashscope_router
from qwenkit.server.routes.openai_api import openai_router
from qwenkit.server.routes.operations import operations_router
from qwenkit.server.routes.responses_api import responses_router
from qwenkit.server.routes.retrieval_api import retrieval_router
from qwenkit.server.security import browser_guard
from qwenkit.server.watch import RequestWatch, record_refusal, request_id_of

__all__ = ["ServerConfig", "create_app"]


def create_app(allm, config: ServerConfig | None = None) -> Any:
    """The ASGI app serving `allm` (an `AsyncLLM`), wrapped in the API-key / body-size guard,
    the Host / Origin checks and the request watch."""
    config = config or ServerConfig()
    ctx = ServerContext.create(allm, config)
    app = FastAPI(title="qwenkit", version="0.1.0",
                  description="OpenAI- and DashScope-compatible API over a local Qwen model.")
    install_openapi(app, config)
    _answer_errors(app)
    for router in (openai_router(ctx), responses_router(ctx), dashscope_router(ctx), retrieval_router(ctx),
                   operations_router(ctx)):
        app.include_router(router)
    guarded = Guard(app, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    if config.web:
        from qwenkit.server.web import mount_web

        guarded = mount_web(app, guarded, config)
    routes = route_table(app)
    return RequestWatch(browser_guard(guarded, config),
                        on_response=lambda path, status: ctx.metrics.response(routes.match(path)[0], status))


def _answer_errors(app: FastAPI) -> None:
    """Every error as the route's protocol writes them: DashScope's shape on its paths,
    OpenAI's elsewhere."""

    def error_response(request: Request, error: APIError) -> JSONResponse:
        record_refusal(request, error)
        if is_dashscope_path(request.url.path):
            body = dashscope_error(error, request_id_of(request))
        else:
            body = openai_error(error)
        return JSONResponse(body, status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, error: APIError):
        return error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError):
        message, param = validation_message(list(error.errors()))
        return error_response(request, APIError(400, message, param=param))

    @app.exception_handler(404)
    async def on_not_found(request: Request, error):
        return error_response(request, APIError(404, f"no route {request.method} {request.url.path}: the path is "
                                                     "unknown to this server", code="unknown_route"))

    @app.exception_handler(405)
    async def on_bad_method(request: Request, error):
        allow = ", ".join(sorted(route_table(app).match(request.url.path)[1]))
        return error_response(request, APIError(405, f"{request.method} is not allowed on {request.url.path} "
                                                     f"(allowed: {allow})", headers={"Allow": allow}))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, error: HTTPException):
        # FastAPI's one 400 of its own: a body it cannot parse (not UTF-8, nested too deep).
        message = unparsable_body_message(await request.body()) if error.status_code == 400 else str(error.detail)
        return error_response(request, APIError(error.status_code, message, headers=error.headers))
