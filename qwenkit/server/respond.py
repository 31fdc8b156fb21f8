"""A generation turned into an HTTP answer: a stream of server-sent events, or one response.

Every generating route ends the same way: the engine's items (chat chunks, or sequence
updates for raw completions) are written as the route's protocol writes them, either as
they come (`EventStream`) or gathered into one response. `respond` is that one way; the
protocol modules supply the writing, as an `Answer`. A client that leaves, during a long
prefill as much as mid-stream, has its request cancelled (`qwenkit.server.watch`, the
one place that watches the connection); the generation is then closed here, which frees
its KV blocks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

from fastapi import Request
from starlette.responses import Response

from qwenkit.errors import QwenkitError
from qwenkit.server.errors import APIError, bad_request
from qwenkit.server.watch import record_refusal

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
        return EventStream(_events(items, answer, lambda error: record_refusal(request, error)), items.aclose)
    try:
        async for item in items:
            answer.add(item)
    finally:
        await items.aclose()
    return await answer.whole()


async def _events(items: AsyncIterator[Any], answer: Answer,
                  on_fail: Callable[[APIError], None]) -> AsyncIterator[bytes]:
    for data in answer.start():
        yield data
    try:
        async for item in items:
            for data in answer.events(item):
                yield data
    except (ValueError, QwenkitError, APIError) as e:
        error = e if isinstance(e, APIError) else bad_request(e)
        on_fail(error)
        for data in answer.fail(error):
            yield data
        return
    for data in await answer.end():
        yield data


class EventStream(Response):
    """A text/event-stream response that closes its generation however it ends: finished,
    failed, or cancelled because the client left (`qwenkit.server.watch`)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], close: Callable[[], Awaitable[None]]):
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.events = events
        self.close = close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection broke under a write: nobody is left to answer
            pass
        finally:
            await self.events.aclose()
            await self.close()
