"""What every router shares: the engine, the served names, request slots, metrics, deadlines.

A generation is opened in a request slot and its first item awaited before the response
starts, so a request the engine refuses (a prompt longer than the context, a bad schema)
still gets a plain 400 rather than a stream that breaks. A client that leaves meanwhile
(in the slot queue, during the prefill) cancels the request (`qwenkit.server.watch`):
the generation is closed where the cancellation finds it, which aborts it in the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from qwenkit.capabilities import model_capabilities
from qwenkit.chat.request import ChatRequest
from qwenkit.chat.types import ChatChunk
from qwenkit.engine.llm_engine import SequenceUpdate
from qwenkit.errors import QwenkitError
from qwenkit.sampling import SamplingParams
from qwenkit.server import openai_protocol as oa
from qwenkit.server.config import ServerConfig
from qwenkit.server.errors import APIError, bad_request
from qwenkit.server.limits import PromptSizeCheck, RequestSlots
from qwenkit.server.metrics import Metrics

T = TypeVar("T")


@dataclass
class ServerContext:
    """One server's state. names: the served model names (the first is reported); listed:
    them and the "default" alias; started: when the server started (Unix seconds)."""

    allm: Any  # AsyncLLM
    config: ServerConfig
    names: list[str]
    listed: list[str]
    slots: RequestSlots
    metrics: Metrics
    prompt_size: PromptSizeCheck
    capabilities: list[str]
    started: int

    @classmethod
    def create(cls, allm, config: ServerConfig) -> ServerContext:
        names = list(config.served_model_names or [allm.llm.model_name])
        # "default" (what the CLI calls the served model) is accepted and listed as an alias.
        listed = names + [oa.DEFAULT_MODEL] * (oa.DEFAULT_MODEL not in names)
        slots = RequestSlots(config.max_running_requests, config.max_waiting_requests, config.retry_after_s)
        prompt_size = PromptSizeCheck(allm.tokenizer, allm.llm.max_model_len)
        # Read now, beside the start, so that the first huge prompt is refused at once too.
        threading.Thread(target=prompt_size.warm, name="qwenkit-vocabulary", daemon=True).start()
        return cls(allm, config, names, listed, slots, Metrics(allm, slots), prompt_size,
                   model_capabilities(allm.llm).names(), int(time.time()))

    def check_model(self, name: str | None) -> str:
        """The name to report for a request that asked for model `name` (404 if not served)."""
        if name is not None and name not in self.listed:
            raise APIError(404, f"The model `{name}` does not exist; this server serves {', '.join(self.listed)}.",
                           param="model", code="model_not_found")
        return self.names[0]

    async def check_prompt(self, texts: list[str]) -> None:
        """A 400 for prompt texts too long for the context, before they are tokenized whole."""
        await asyncio.to_thread(self.prompt_size.check, texts)

    def token_decoder(self, wanted: bool) -> Callable[[int], str] | None:
        """id -> the token's own text, for logprobs (None when the request asked for none)."""
        return oa.token_decoder(self.allm.llm.tokenizer.decode) if wanted else None

    async def open_chat(self, request: ChatRequest, request_id: str) -> AsyncIterator[ChatChunk]:
        """A chat generation in a request slot; returns its chunks once the first is here."""
        if self.config.allow_image_urls:  # http(s) image URLs fetched first (else the engine refuses them)
            from qwenkit.multimodal.fetch import fetch_message_images

            try:
                messages = await fetch_message_images(request.messages, max_bytes=self.allm.llm.image_limits.max_bytes,
                                                      timeout_s=self.config.image_fetch_timeout_s)
            except QwenkitError as e:
                raise bad_request(e, oa.REQUEST_FIELDS) from e
            if messages is not None:
                request = dataclasses.replace(request, messages=messages)

        def count_usage(chunk: ChatChunk) -> None:
            if chunk.usage is not None:
                self.metrics.usage(chunk.usage)

        return await self._open(lambda: self.allm.chat_stream(request, request_id=request_id), on_item=count_usage)

    async def open_completion(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, *,
                              on_close: Callable[[], None]) -> AsyncIterator[SequenceUpdate]:
        """A raw generation in a request slot; returns its updates once the first is here."""
        return await self._open(
            lambda: self.allm.generate_stream(prompt_token_ids, params, request_id=request_id), on_close=on_close
        )

    async def _open(self, start: Callable[[], AsyncIterator[T]], *, on_item: Callable[[T], None] = lambda item: None,
                    on_close: Callable[[], None] = lambda: None) -> AsyncIterator[T]:
        if "completion" not in self.capabilities:
            raise APIError(400, f"the model `{self.names[0]}` is an embedding model and cannot generate: "
                                "use /v1/embeddings", param="model", code="model_not_generative")
        await self.slots.acquire()
        begun = time.perf_counter()
        items = start()
        first = await self._first(items)
        self.metrics.first_token(time.perf_counter() - begun)

        async def all_items() -> AsyncIterator[T]:
            try:
                on_item(first)
                yield first
                async for item in items:
                    self._check_deadline(begun)
                    on_item(item)
                    yield item
            finally:
                await items.aclose()
                self.slots.release()
                self.metrics.latency(time.perf_counter() - begun)
                on_close()

        return all_items()

    async def _first(self, items: AsyncIterator[T]) -> T:
        """A generation's first item, taken in a request slot: if the engine refuses the
        request, the slot is released and the refusal is a 400."""
        try:
            return await items.__anext__()
        except BaseException as e:
            self.slots.release()
            await items.aclose()
            if isinstance(e, (ValueError, QwenkitError)):
                raise bad_request(e, oa.REQUEST_FIELDS) from e
            raise

    def _check_deadline(self, begun: float) -> None:
        timeout = self.config.request_timeout_s
        if timeout is not None and time.perf_counter() - begun > timeout:
            raise APIError(504, f"the request ran past the server's {timeout:g} s timeout", code="timeout")


def as_400(translate: Callable[..., T], *args: Any) -> T:
    """`translate(*args)`, its ValueError (a field at fault) a 400 naming the field."""
    try:
        return translate(*args)
    except (ValueError, QwenkitError) as e:
        raise bad_request(e, oa.REQUEST_FIELDS) from e
