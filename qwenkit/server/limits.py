"""What guards the engine: the API key, the body size limit and the request slots."""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.routing import Mount, compile_path

from qwenkit.server.errors import APIError, dashscope_error, openai_error

# Paths anyone may read: probes and the API description.
OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


UNMATCHED_ROUTE = "unmatched"


def is_dashscope_path(path: str) -> bool:
    return path.startswith("/api/")


class RouteTable:
    """The app's route templates and their methods, matched against raw paths: metrics label
    a request by its template (or "unmatched"), so random paths cannot grow the label set,
    and a 405 lists the methods the path has. Built on first use, once every route exists,
    from the OpenAPI paths (routers included with prefixes are flattened there) and the
    app's own routes and mounts (the page, the static files, the docs)."""

    def __init__(self, app):
        self.app = app
        self._routes: list[tuple[re.Pattern[str], str, frozenset[str]]] | None = None

    def _load(self) -> list[tuple[re.Pattern[str], str, frozenset[str]]]:
        methods: dict[str, set[str]] = {}
        for path, operations in self.app.openapi().get("paths", {}).items():
            methods.setdefault(path, set()).update(m.upper() for m in operations)
        mounts = []
        for route in self.app.routes:
            if isinstance(route, Mount):
                mounts.append((compile_path(route.path.rstrip("/") + "/{path:path}")[0], route.path, frozenset()))
            elif isinstance(getattr(route, "path", None), str):
                methods.setdefault(route.path, set()).update(getattr(route, "methods", None) or ())
        return [(compile_path(path)[0], path, frozenset(m)) for path, m in methods.items()] + mounts

    def match(self, path: str) -> tuple[str, frozenset[str]]:
        """(the template, its methods) of the route at `path`; ("unmatched", {}) for none."""
        if self._routes is None:
            self._routes = self._load()
        for regex, template, methods in self._routes:
            if regex.match(path):
                return template, methods
        return UNMATCHED_ROUTE, frozenset()


def route_table(app) -> RouteTable:
    """The `RouteTable` of a FastAPI app (one per app)."""
    if getattr(app.state, "route_table", None) is None:
        app.state.route_table = RouteTable(app)
    return app.state.route_table


async def send_error(send, path: str, error: APIError) -> None:
    """Answer with `error` in the shape of the route's protocol."""
    body = dashscope_error(error, secrets.token_hex(16)) if is_dashscope_path(path) else openai_error(error)
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class Guard:
    """ASGI middleware: the API key (Bearer, compared in constant time), the body size
    limit (413, also for chunked bodies: the body is read here, then replayed), and a
    record of each response's status for the metrics."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int,
                 on_response: Callable[[str, int], None] | None = None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.on_response = on_response
        self.routes = route_table(app)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = [500]

        async def send_recording(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            error = self._check_key(scope) if path not in OPEN_PATHS else None
            if error is None:
                error, receive = await self._read_body(scope, receive)
            if error is not None:
                return await send_error(send_recording, path, error)
            await self.app(scope, receive, send_recording)
        finally:
            if self.on_response is not None:
                self.on_response(self.routes.match(path)[0], status[0])

    def _check_key(self, scope) -> APIError | None:
        if self.api_key is None:
            return None
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
        if hmac.compare_digest(given, self.api_key):
            return None
        return APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
                        code="invalid_api_key")

    async def _read_body(self, scope, receive) -> tuple[APIError | None, Callable[[], Awaitable[dict[str, Any]]]]:
        too_large = APIError(413, f"the request body is larger than {self.max_body_bytes} bytes",
                             code="request_too_large")
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                return too_large, receive
        if scope["method"] in ("GET", "HEAD"):
            return None, receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, _replay([message], receive)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return too_large, receive
            if not message.get("more_body", False):
                break
        return None, _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)


def _replay(messages: list[dict[str, Any]], receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()
    return replayed


class RequestSlots:
    """At most `max_running` generations at once and `max_waiting` waiting for a turn;
    past that a request is refused with 429 and Retry-After."""

    def __init__(self, max_running: int, max_waiting: int, retry_after_s: int = 1):
        if max_running < 1 or max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self.num_running = 0
        self.num_waiting = 0
        self._semaphore = asyncio.Semaphore(max_running)

    async def acquire(self) -> None:
        if self.num_running >= self.max_running and self.num_waiting >= self.max_waiting:
            raise APIError(429, f"the server is busy ({self.num_running} requests running, {self.num_waiting} "
                                "waiting); retry later", code="rate_limit_exceeded",
                           headers={"Retry-After": str(self.retry_after_s)})
        self.num_waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.num_waiting -= 1
        self.num_running += 1

    def release(self) -> None:
        self.num_running -= 1
        self._semaphore.release()
