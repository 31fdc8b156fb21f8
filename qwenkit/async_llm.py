"""`AsyncLLM`: the engine on a background thread, for asyncio code such as the server.

One thread owns the engine and steps it while any request is unfinished; requests and
aborts reach it through a command queue, and each step's updates are handed back to the
event loop of the coroutine that asked. Leaving a stream early (a client that
disconnects, a cancelled task) aborts its request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from qwenkit.chat.request import ChatRequest, chat_request
from qwenkit.chat.stream import ChatStream
from qwenkit.chat.types import ChatChunk, ChatCompletion
from qwenkit.engine.llm_engine import SequenceUpdate
from qwenkit.engine.threads import configure_threads
from qwenkit.llm import LLM
from qwenkit.sampling import SamplingParams

if TYPE_CHECKING:
    from qwenkit.embedding import Embeddings, Scores

_DONE = object()


class AsyncLLM:
    """Same model arguments as `LLM`; the engine steps on its own thread."""

    def __init__(self, model: str | None = "default", dtype=None, device=None, *, threads: int | None = None,
                 **engine_kwargs: Any):
        self.llm = LLM(model, dtype, device, threads=threads, **engine_kwargs)
        self.tokenizer = self.llm.tokenizer
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qwenkit-engine", daemon=True)
        self._thread.start()

    # -- the engine thread -------------------------------------------------------------

    def _run(self) -> None:
        engine = self.llm.engine
        if self.llm.device.type == "cpu":  # OpenMP's thread count is per calling thread: this one computes
            configure_threads()
        while not self._closed:
            block = not engine.has_unfinished_requests()
            try:
                while True:
                    fn, future = self._commands.get(block=block, timeout=0.5 if block else None)
                    block = False
                    if not future.set_running_or_notify_cancel():
                        continue  # its caller was cancelled first (a client that left): skip it
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # handed to the caller
                        future.set_exception(e)
            except queue.Empty:
                pass
            if not engine.has_unfinished_requests():
                continue
            try:
                updates = engine.step()
            except BaseException as e:  # a failed step fails its requests, not the thread
                for request_id in list(engine.requests):
                    engine.abort(request_id)
                    self._deliver(request_id, e)
                continue
            finished = set()
            for update in updates:
                self._deliver(update.request_id, update)
                if update.finish_reason is not None and update.request_id not in engine.requests:
                    finished.add(update.request_id)
            for request_id in finished:  # after every choice's last update of this step
                self._deliver(request_id, _DONE)

    def _deliver(self, request_id: str, item: Any) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("the engine is shut down")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, future))
        return future

    # -- the asyncio side --------------------------------------------------------------

    async def generate_stream(
        self, prompt_token_ids: list[int], sampling_params: SamplingParams, *, request_id: str | None = None,
        **request_kwargs: Any,
    ) -> AsyncIterator[SequenceUpdate]:
        """Yield one request's `SequenceUpdate`s as the engine produces them."""
        request_id = request_id or self.llm.new_request_id()
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        finished = False
        try:
            engine = self.llm.engine
            await asyncio.wrap_future(
                self._call(lambda: engine.add_request(request_id, prompt_token_ids, sampling_params, **request_kwargs))
            )
            while True:
                item = await q.get()
                if item is _DONE:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished and not self._closed:
                self._call(lambda: self.llm.engine.abort(request_id))

    async def chat_stream(
        self, messages: list[dict[str, Any]] | ChatRequest, sampling_params: SamplingParams | None = None, *,
        request_id: str | None = None, **options: Any,
    ) -> AsyncIterator[ChatChunk]:
        """`LLM.chat_stream` for asyncio: reasoning / content / tool-call deltas as they come."""
        stream = await self._start_chat(chat_request(messages, sampling_params, **options), request_id)
        async for update in self._updates(stream):
            yield stream.apply(update)

    async def chat(self, messages: list[dict[str, Any]] | ChatRequest, sampling_params: SamplingParams | None = None,
                   **options: Any) -> ChatCompletion:
        """`LLM.chat` for asyncio. With n > 1, the first choice."""
        stream = await self._start_chat(chat_request(messages, sampling_params, **options), None)
        async for update in self._updates(stream):
            stream.apply(update)
        return stream.completions()[0]

    async def _start_chat(self, request: ChatRequest, request_id: str | None) -> ChatStream:
        prepared = await asyncio.to_thread(self.llm.prepare_chat, request)  # renders and tokenizes: off the loop
        return ChatStream(request_id or self.llm.new_request_id(), prepared)

    def _updates(self, stream: ChatStream) -> AsyncIterator[SequenceUpdate]:
        p = stream.prepared
        return self.generate_stream(p.prompt_token_ids, p.params, request_id=stream.request_id,
                                    fallback=p.fallback, controls=p.controls, multimodal=p.multimodal)

    async def embed(self, texts: str | Sequence[str | Sequence[int]], *, instruction: str | None = None,
                    dimensions: int | None = None) -> Embeddings:
        """`LLM.embed` for asyncio, run on the engine thread between two generation steps; the
        result also counts the tokens computed (`Embeddings.num_tokens`, for usage)."""
        from qwenkit import embedding

        return await asyncio.wrap_future(self._call(
            lambda: embedding.embed(self.llm, texts, instruction=instruction, dimensions=dimensions)))

    async def score(self, query: str, documents: str | Sequence[str], *, instruction: str | None = None) -> Scores:
        """`LLM.score` for asyncio (Qwen3-Reranker's P("yes") per document, `Scores.data`), run on
        the engine thread between two generation steps."""
        from qwenkit import embedding

        return await asyncio.wrap_future(self._call(
            lambda: embedding.score(self.llm, query, documents, instruction=instruction)))

    async def abort(self, request_id: str) -> bool:
        """Stop a request and free what it holds."""
        def abort() -> bool:
            found = self.llm.engine.abort(request_id)
            self._deliver(request_id, _DONE)  # ends a stream that is waiting on it
            return found

        return await asyncio.wrap_future(self._call(abort))

    def shutdown(self) -> None:
        """Stop the engine thread (running requests are abandoned)."""
        self._closed = True
        self._thread.join(timeout=5)
        self.llm.shutdown()
