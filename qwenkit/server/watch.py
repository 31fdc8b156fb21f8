"""One HTTP request watched from its body's last byte to its answer's: the client's
presence, the request's id, and why it was refused.

A client that goes away cancels its request wherever the request is: waiting for a slot,
tokenizing, in a long prefill before the first token, gathering a whole answer or
mid-stream. Cancelling closes the generation, and a closed generation is aborted by the
engine before its next step, which frees its KV blocks. This is the one place that
watches the connection (an ASGI wrapper around the whole app, so every route is
covered); the routes and `respond` only close what they opened when cancelled.

Every request has an id (`x-request-id` on the answer; a route that names its own, as
``chatcmpl-...``, reports that one). Every refusal (an error answer, an error event that
ends a stream, a client that left) is logged as a warning on the ``qwenkit.server``
logger with that id and the reason: the access log says only method, path and status.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from qwenkit.server.errors import APIError, printable

logger = logging.getLogger("qwenkit.server")

CLIENT_CLOSED = 499  # nginx's status for a request whose client left before its answer was complete
_MAX_LOGGED_PATH = 200


def name_request(request: Any, request_id: str) -> str:
    """Make `request_id` the id that the log, `x-request-id` and error bodies give the
    request (a Starlette request, or an ASGI scope's ``state`` dict)."""
    _state(request)["request_id"] = request_id
    return request_id


def request_id_of(request: Any) -> str:
    """The id of a request (a Starlette request, or an ASGI scope's ``state`` dict)."""
    return _state(request).setdefault("request_id", secrets.token_hex(16))


def record_refusal(request: Any, error: APIError) -> None:
    """Note why a request is refused, for the log line written when it ends."""
    _state(request)["refusal"] = error


def _state(request: Any) -> dict[str, Any]:
    if isinstance(request, dict):
        return request
    return request.scope.setdefault("state", {})


class RequestWatch:
    """ASGI middleware: a request whose client disconnects before its answer is complete
    is cancelled; each request gets an id; each refusal is logged, and every answer is
    counted by `on_response(path, status)` (a client that left: 499)."""

    def __init__(self, app, *, on_response: Callable[[str, int], None] | None = None):
        self.app = app
        self.on_response = on_response

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        request_id_of(state)
        watched = _Watched(receive, send, state)
        watched.task = asyncio.ensure_future(self.app(scope, watched.receive, watched.send))
        try:
            await watched.task
        except asyncio.CancelledError:
            if not watched.client_left or asyncio.current_task().cancelling():
                raise  # the server itself is stopping
        finally:
            if watched.watcher is not None:
                watched.watcher.cancel()
            self._finish(scope, watched)

    def _finish(self, scope, watched: _Watched) -> None:
        status = CLIENT_CLOSED if watched.client_left else watched.status or 500
        path = scope["path"]
        if self.on_response is not None:
            self.on_response(path, status)
        refusal: APIError | None = watched.state.get("refusal")
        if watched.client_left:
            reason = "the client closed the connection before the answer was complete"
        elif refusal is not None:
            reason = refusal.message if refusal.status == status else f"{refusal.status} in the stream: {refusal.message}"
        elif status >= 400:
            reason = "an unexpected error" if status >= 500 else HTTPStatus(status).phrase
        else:
            return
        shown = printable(path if len(path) <= _MAX_LOGGED_PATH else path[:_MAX_LOGGED_PATH] + "...")
        logger.warning("request %s refused: %d %s %s: %s", watched.state["request_id"], status, scope["method"],
                       shown, reason)


class _Watched:
    """One request's channels, watched: once its body is read, a task waits for the client
    to disconnect and then cancels the app's task unless the answer is complete."""

    def __init__(self, receive, send, state: dict[str, Any]):
        self._receive = receive
        self._send = send
        self.state = state
        self.task: asyncio.Future | None = None
        self.watcher: asyncio.Future | None = None
        self.gone = asyncio.Event()  # the client left, or the answer is complete
        self.client_left = False
        self.status: int | None = None
        self.complete = False

    async def receive(self) -> dict[str, Any]:
        if self.watcher is not None:  # the body is read: only a disconnect is left to say
            await self.gone.wait()
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.client_left = not self.complete
        elif not message.get("more_body", False):
            self.watcher = asyncio.ensure_future(self._watch())
        return message

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone.set()
        if not self.complete:
            self.client_left = True
            self.task.cancel()

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            request_id = self.state["request_id"].encode("latin-1", "replace")
            message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id)]}
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True
        await self._send(message)
