"""The ASGI app: thin handlers over `AsyncLLM` and the protocol modules.

Each handler validates the body (pydantic), asks its protocol module for the engine call,
takes a request slot, starts the generation and hands the engine's chunks back to the
protocol module to encode. A stream's first chunk is awaited before the response starts,
so a request the engine refuses (a prompt longer than the context, a bad schema) still
gets a plain 400 rather than a stream that breaks.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.responses import Response

from qwenkit.capabilities import detect_capabilities
from qwenkit.chat.types import ChatChunk
from qwenkit.errors import QwenkitError
from qwenkit.server import dashscope_protocol as ds
from qwenkit.server import openai_protocol as oa
from qwenkit.server import responses_protocol as rp
from qwenkit.server.errors import (
    APIError, bad_request, dashscope_error, openai_error, unparsable_body_message, validation_message,
)
from qwenkit.server.limits import (
    Guard, PromptSizeCheck, RequestSlots, is_dashscope_path, prompt_texts, route_table,
)
from qwenkit.server.metrics import Metrics
from qwenkit.server.openapi import install_openapi
from qwenkit.server.response_store import ResponseStore
from qwenkit.server.security import browser_guard


@dataclass
class ServerConfig:
    """How the server answers. served_model_names: the names clients may ask for (default:
    the model's own name); the first is the one responses report."""

    served_model_names: list[str] | None = None
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_running_requests: int = 64
    max_waiting_requests: int = 256
    retry_after_s: int = 1
    request_timeout_s: float | None = None  # a generation running longer is aborted (504)
    web: bool = True  # the chat page at /
    mcp_config: str | None = None  # path of {"mcpServers": {...}} JSON: tools the web page may call
    chat_db: str | None = None  # SQLite file of the web page's conversations (default: in the qwenkit home)
    responses_db: str | None = None  # SQLite file of stored /v1/responses (default: in the qwenkit home)
    # Host names answered beside the loopback names and bind_host ("*": any); see server/security.py.
    allowed_hosts: list[str] | None = None
    bind_host: str = "127.0.0.1"  # the address served on (`serve` sets it)


DASHSCOPE_ROUTE = "/api/v1/services/aigc/text-generation/generation"


def create_app(allm, config: ServerConfig | None = None) -> Any:
    """The ASGI app serving `allm` (an `AsyncLLM`), wrapped in the API-key / body-size guard
    and the Host / Origin checks."""
    config = config or ServerConfig()
    names = list(config.served_model_names or [allm.llm.model_name])
    # "default" (what the CLI calls the served model) is accepted and listed as an alias.
    listed = names + [oa.DEFAULT_MODEL] * (oa.DEFAULT_MODEL not in names)
    slots = RequestSlots(config.max_running_requests, config.max_waiting_requests, config.retry_after_s)
    metrics = Metrics(allm, slots)
    prompt_size = PromptSizeCheck(allm.tokenizer, allm.llm.max_model_len)
    started = int(time.time())
    app = FastAPI(title="qwenkit", version="0.1.0",
                  description="OpenAI- and DashScope-compatible API over a local Qwen model.")
    app.state.allm, app.state.slots, app.state.metrics = allm, slots, metrics
    install_openapi(app, config)

    def token_decoder(wanted: bool):
        """id -> the token's own text, for logprobs (None when the request asked for none)."""
        return oa.token_decoder(allm.llm.tokenizer.decode) if wanted else None

    def check_model(name: str | None) -> str:
        if name is not None and name not in listed:
            raise APIError(404, f"The model `{name}` does not exist; this server serves {', '.join(listed)}.",
                           param="model", code="model_not_found")
        return names[0]

    def check_deadline(begun: float) -> None:
        if config.request_timeout_s is not None and time.perf_counter() - begun > config.request_timeout_s:
            raise APIError(504, f"the request ran past the server's {config.request_timeout_s:g} s timeout",
                           code="timeout")

    # -- errors ------------------------------------------------------------------------

    def error_response(request: Request, error: APIError) -> JSONResponse:
        if is_dashscope_path(request.url.path):
            body = dashscope_error(error, getattr(request.state, "request_id", None) or secrets.token_hex(16))
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
        return error_response(request, APIError(404, f"no route {request.method} {request.url.path}"))

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

    # -- generation --------------------------------------------------------------------

    async def first_item(stream: AsyncIterator[Any]) -> Any:
        """A generation's first item, taken in a request slot: if the engine refuses the
        request, the slot is released and the refusal is a 400."""
        try:
            return await stream.__anext__()
        except BaseException as e:
            slots.release()
            await stream.aclose()
            if isinstance(e, (ValueError, QwenkitError)):
                raise bad_request(e, oa.REQUEST_FIELDS) from e
            raise

    async def open_chat(call: oa.ChatCall, request_id: str) -> AsyncIterator[ChatChunk]:
        """Start a chat generation in a request slot; returns its chunks once the first is here."""
        await slots.acquire()
        begun = time.perf_counter()
        chunks = allm.chat_stream(call.messages, call.params, request_id=request_id, **call.kwargs)
        first = await first_item(chunks)
        metrics.first_token(time.perf_counter() - begun)

        async def rest() -> AsyncIterator[ChatChunk]:
            try:
                yield first
                async for chunk in chunks:
                    check_deadline(begun)
                    if chunk.usage is not None:
                        metrics.usage(chunk.usage)
                    yield chunk
                if first.usage is not None:
                    metrics.usage(first.usage)
            finally:
                await chunks.aclose()
                slots.release()
                metrics.latency(time.perf_counter() - begun)

        return rest()

    # -- OpenAI ------------------------------------------------------------------------

    async def chat_completions(body: oa.ChatCompletionRequest, request: Request):
        model = check_model(body.model)
        call = _as_400(oa.chat_call, body)
        await asyncio.to_thread(prompt_size.check, prompt_texts(call.messages))
        request_id = "chatcmpl-" + secrets.token_hex(12)
        chunks = await open_chat(call, request_id)
        decode = token_decoder(call.params.logprobs)
        if body.stream:
            encoder = oa.ChatStreamEncoder(request_id, model, call.include_usage, decode=decode)

            async def events() -> AsyncIterator[bytes]:
                try:
                    async for chunk in chunks:
                        for out in encoder.encode(chunk):
                            yield oa.sse(out)
                except (ValueError, QwenkitError, APIError) as e:
                    yield oa.sse(openai_error(e if isinstance(e, APIError) else bad_request(e)))
                yield oa.SSE_DONE

            return EventStream(events(), chunks.aclose)
        accumulator = oa.ChatAccumulator(decode=decode)

        async def gather() -> None:
            async for chunk in chunks:
                accumulator.add(chunk)

        await _unless_disconnected(request, gather(), chunks.aclose)
        return accumulator.response(id=request_id, model=model)

    app.post("/v1/chat/completions", summary="OpenAI chat completions")(chat_completions)
    app.post("/compatible-mode/v1/chat/completions", summary="DashScope's OpenAI-compatible chat")(chat_completions)

    @app.post("/v1/completions", summary="OpenAI (legacy) text completions")
    async def completions(body: oa.CompletionRequest, request: Request):
        model = check_model(body.model)
        call = _as_400(oa.completion_call, body)
        if isinstance(call.prompt, str):
            await asyncio.to_thread(prompt_size.check, [call.prompt])
        prompt_ids = call.prompt if isinstance(call.prompt, list) else _as_400(allm.tokenizer.encode, call.prompt)
        request_id = "cmpl-" + secrets.token_hex(12)
        await slots.acquire()
        begun = time.perf_counter()
        updates = allm.generate_stream(prompt_ids, call.params, request_id=request_id)
        first = await first_item(updates)
        metrics.first_token(time.perf_counter() - begun)
        decode = (lambda i: allm.tokenizer.decode([i])) if call.params.logprobs else None
        encoder = oa.CompletionEncoder(request_id, model, decode, call.include_usage)

        async def all_updates():
            try:
                yield first
                async for update in updates:
                    check_deadline(begun)
                    yield update
            finally:
                await updates.aclose()
                slots.release()
                metrics.latency(time.perf_counter() - begun)
                metrics.tokens(prompt=encoder.num_prompt_tokens, generated=encoder.num_generated,
                               cached=encoder.num_cached_tokens)

        if body.stream:
            async def events() -> AsyncIterator[bytes]:
                try:
                    async for update in all_updates():
                        out = encoder.add(update)
                        if out is not None:
                            yield oa.sse(out)
                except APIError as e:
                    yield oa.sse(openai_error(e))
                if call.include_usage:
                    yield oa.sse(encoder.usage_chunk())
                yield oa.SSE_DONE

            return EventStream(events(), updates.aclose)

        async def gather() -> None:
            async for update in all_updates():
                encoder.add(update)

        await _unless_disconnected(request, gather(), updates.aclose)
        return encoder.response()

    capabilities = detect_capabilities(allm.llm.tokenizer).names()

    async def models() -> oa.ModelList:
        return oa.models_response(listed, served=names[0], max_model_len=allm.llm.max_model_len, created=started,
                                  capabilities=capabilities)

    app.get("/v1/models", summary="The served models")(models)
    app.get("/compatible-mode/v1/models", summary="The served models (DashScope path)")(models)

    async def model(model_id: str) -> oa.ModelCard:
        check_model(model_id)
        return oa.model_card(model_id, served=names[0], max_model_len=allm.llm.max_model_len, created=started,
                             capabilities=capabilities)

    app.get("/v1/models/{model_id}", summary="One served model")(model)
    app.get("/compatible-mode/v1/models/{model_id}", summary="One served model (DashScope path)")(model)

    # -- OpenAI Responses --------------------------------------------------------------

    store = ResponseStore(config.responses_db)

    @app.post("/v1/responses", summary="OpenAI Responses", response_model=rp.Response,
              responses={200: {"content": {"text/event-stream": {"description": "with stream: true, typed "
                                                                 "events (response.created ... response.completed)"}}}})
    async def create_response(body: rp.ResponsesRequest, request: Request):
        model = check_model(body.model)
        previous = None
        if body.previous_response_id:
            previous = await asyncio.to_thread(store.conversation, body.previous_response_id)
            if previous is None:
                raise APIError(404, f"previous_response_id {body.previous_response_id!r} is not a stored response",
                               param="previous_response_id", code="previous_response_not_found")
        call = _as_400(lambda b: rp.responses_call(b, previous), body)
        builder = rp.ResponseBuilder(rp.new_id("resp"), model, body)
        chunks = await open_chat(call.chat, builder.id)

        async def save() -> rp.Response:
            response = builder.final()
            if body.store is not False:
                reply = builder.assistant_message()
                await asyncio.to_thread(store.save, response.model_dump(mode="json", by_alias=True),
                                        call.conversation + ([reply] if reply else []))
            return response

        if body.stream:
            async def events() -> AsyncIterator[bytes]:
                for event in builder.start():
                    yield rp.sse(event)
                try:
                    async for chunk in chunks:
                        for event in builder.add(chunk):
                            yield rp.sse(event)
                except (ValueError, QwenkitError, APIError) as e:
                    error = e if isinstance(e, APIError) else bad_request(e)
                    yield rp.sse(builder.error_event(error.message, code=error.code, param=error.param))
                    return
                last = builder.finish()
                await save()  # before the client hears it is complete (and may go on from it)
                for event in last:
                    yield rp.sse(event)

            return EventStream(events(), chunks.aclose)

        async def gather() -> None:
            async for chunk in chunks:
                builder.add(chunk)

        await _unless_disconnected(request, gather(), chunks.aclose)
        return await save()

    @app.get("/v1/responses/{response_id}", summary="A stored response", response_model=rp.Response)
    async def get_response(response_id: str):
        response = await asyncio.to_thread(store.response, response_id)
        if response is None:
            raise APIError(404, f"no stored response {response_id!r}", param="response_id", code="not_found")
        return response

    # -- DashScope ---------------------------------------------------------------------

    @app.post(DASHSCOPE_ROUTE, summary="DashScope text generation")
    async def generation(body: ds.GenerationRequest, request: Request):
        request_id = secrets.token_hex(16)
        request.state.request_id = request_id
        check_model(body.model)
        call = _as_400(ds.generation_call, body)
        await asyncio.to_thread(prompt_size.check, prompt_texts(call.chat.messages))
        chunks = await open_chat(call.chat, request_id)
        encoder = ds.GenerationEncoder(request_id, call.result_format, call.incremental_output,
                                       decode=token_decoder(call.chat.params.logprobs))
        stream = request.headers.get("x-dashscope-sse", "").lower() == "enable" or body.parameters.stream
        if stream:
            async def events() -> AsyncIterator[bytes]:
                number = 0
                try:
                    async for chunk in chunks:
                        out = encoder.encode(chunk)
                        if out is not None:
                            number += 1
                            yield ds.sse_event(number, out)
                except (ValueError, QwenkitError, APIError) as e:
                    error = e if isinstance(e, APIError) else bad_request(e)
                    yield ds.sse_event(number + 1, dashscope_error(error, request_id), status=error.status)

            return EventStream(events(), chunks.aclose)

        async def gather() -> None:
            async for chunk in chunks:
                encoder.encode(chunk)

        await _unless_disconnected(request, gather(), chunks.aclose)
        return encoder.response()

    # -- operations --------------------------------------------------------------------

    @app.get("/health", summary="Liveness: 200 while the engine runs")
    async def health():
        return {"status": "ok", "model": names[0]}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus_metrics():
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    guarded = Guard(app, api_key=config.api_key, max_body_bytes=config.max_body_bytes, on_response=metrics.response)
    if config.web:
        from qwenkit.server.web import mount_web

        return browser_guard(mount_web(app, guarded, config), config)
    return browser_guard(guarded, config)


def _as_400(translate: Callable[[Any], Any], body: Any) -> Any:
    try:
        return translate(body)
    except (ValueError, QwenkitError) as e:
        raise bad_request(e, oa.REQUEST_FIELDS) from e


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[None], close: Callable[[], Awaitable[None]]) -> None:
    """Run `work`; a client that goes away meanwhile cancels it (which aborts its generation)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
        await close()
    if task.cancelled():
        raise APIError(499, "the client closed the request")
    task.result()  # re-raise what went wrong


class EventStream(Response):
    """A text/event-stream response that notices a client leaving even between events
    (during a long prefill) and then closes the generation, which frees its KV blocks."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], close: Callable[[], Awaitable[None]]):
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.events = events
        self.close = close

    async def __call__(self, scope, receive, send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        task = asyncio.ensure_future(stream())
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, watcher):
                t.cancel()
            await asyncio.gather(task, watcher, return_exceptions=True)
            await self.events.aclose()
            await self.close()
        if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), OSError):
            raise task.exception()
