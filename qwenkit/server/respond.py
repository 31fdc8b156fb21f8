"""A generation turned into an HTTP answer: a stream of server-sent events, or one response.

Every generating route ends the same way: the engine's items (chat chunks, or sequence
updates for raw completions) are written as the route's protocol writes them, either as
they come (`EventStream`) or gathered into one response. `respond` is that one way; the
protocol modules supply the writing, as an `Answer`. A client that leaves, during a long
prefill as much as mid-stream, closes the generation, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

from fastapi import Request
from starlette.responses import Response

from qwenkit.errors import QwenkitError
from qwenkit.server.errors import APIError, bad_request

Item = TypeVar("Item", contravariant=True)


class Answer(Protocol[Item]):
    """How one protocol writes a generation's items."""

    def start(self) -> Iterable[bytes]:
        """Events sent before the first item."""

    def events(self, item: Item) -> Iterable[bytes]:
        """One item's events (often none)."""

    def fail(self, error: APIError) -> Iterable[bytes]:
        """The events that end a stream whose generation failed."""

    async def end(self) -> Iterable[bytes]:
        """The events that end a stream."""

    def add(self, item: Item) -> None:
        """Take one item into the whole answer."""

    async def whole(self) -> Any:
        """The whole answer (a JSON-able body or a response model)."""


async def respond(request: Request, items: AsyncIterator[Any], answer: Answer, *, stream: bool) -> Any:
    """`items` written by `answer`: as a stream of events when `stream`, else whole. A
    generation that fails mid-stream ends the stream with the protocol's error event."""
    if stream:
        return EventStream(_events(items, answer), items.aclose)

    async def gather() -> None:
        async for item in items:
            answer.add(item)

    await _unless_disconnected(request, gather(), items.aclose)
    return await answer.whole()


async def _events(items: AsyncIterator[Any], answer: Answer) -> AsyncIterator[bytes]:
    for data in answer.start():
        yield data
    try:
        async for item in items:
            for data in answer.events(item):
                yield data
    except (ValueError, QwenkitError, APIError) as e:
        for data in answer.fail(e if isinstance(e, APIError) else bad_request(e)):
            yield data
        return
    for data in await answer.end():
        yield data


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
