"""The web chat page of `qwenkit serve`: `GET /`, its static files and its small API.

The page (``static/``: plain ES modules, no build step, its three libraries vendored
under ``static/vendor``) streams answers from the server's own /v1/chat/completions,
keeps its conversations on the server (`conversations`, a SQLite file) and runs the
tools of the server's MCP servers through /web/api/tools (`toolbox`). Everything it
loads comes from this server: it works offline, and its Content-Security-Policy
allows nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

from qwenkit.paths import web_chat_db
from qwenkit.server.limits import Guard
from qwenkit.server.web.api import LazyStore, api_router
from qwenkit.server.web.toolbox import Toolbox

__all__ = ["mount_web", "STATIC_DIR"]

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/web/static/"

_PAGE_HEADERS = {
    # The page loads its own scripts and styles only, talks to this server only, and
    # cannot be framed: an injected <script> or remote resource would not run.
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def is_page_path(path: str) -> bool:
    """Paths anyone may load, API key or not: the page and its static files (no data)."""
    return path == "/" or path.startswith(STATIC_PREFIX)


class _StaticFiles(StaticFiles):
    def file_response(self, *args: Any, **kwargs: Any):
        response = super().file_response(*args, **kwargs)
        response.headers["cache-control"] = "no-cache"  # revalidate (ETag): a pip upgrade shows at once
        response.headers["x-content-type-options"] = "nosniff"
        return response


def mount_web(app: FastAPI, guarded: Guard, config: Any) -> Any:
    """Add the page and its API to `app` (built by `create_app`); returns the ASGI app to
    serve: the page's paths through an open guard, all else through `guarded` (the API key)."""
    toolbox = Toolbox(config.mcp_config) if config.mcp_config else None
    store = LazyStore(Path(config.chat_db).expanduser() if config.chat_db else web_chat_db())
    app.include_router(api_router(store, toolbox))

    async def page():
        return FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS)

    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    app.mount(STATIC_PREFIX.rstrip("/"), _StaticFiles(directory=STATIC_DIR), name="web-static")

    inner_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(asgi_app):
        async with inner_lifespan(asgi_app) as state:
            if toolbox is not None:
                await asyncio.to_thread(toolbox.start)
            try:
                yield state
            finally:
                if toolbox is not None:
                    await asyncio.to_thread(toolbox.close)
                store.close()

    app.router.lifespan_context = lifespan

    return OpenPage(guarded)


class OpenPage:
    """ASGI: the page's own paths through a guard without the API key (the body limit and
    the metrics still apply), everything else through `guarded`. `.app` is the FastAPI app."""

    def __init__(self, guarded: Guard):
        self.guarded = guarded
        self.app = guarded.app
        self.open = Guard(guarded.app, api_key=None, max_body_bytes=guarded.max_body_bytes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and is_page_path(scope["path"]):
            return await self.open(scope, receive, send)
        return await self.guarded(scope, receive, send)
