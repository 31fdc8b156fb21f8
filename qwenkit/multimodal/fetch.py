"""Image URLs fetched by the server, only when it is started with `--allow-image-urls`.

Each http(s) URL is fetched with httpx under the image byte limit (the body streamed and cut
off past it, whatever Content-Length says), a total time limit, at most 3 redirects, and
replaced by the bytes it returned; decoding and its own limits come after (qwenkit/multimodal/image.py).
A URL that fails is an ImageError (a 400) naming it. Fetching reaches whatever the server's host
can reach, local addresses included: allow it only for clients you trust with that.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from qwenkit.multimodal.chat import IMAGE_PART_TYPES
from qwenkit.multimodal.image import ImageError


async def fetch_image(url: str, *, max_bytes: int, timeout_s: float) -> bytes:
    import httpx

    deadline = time.monotonic() + timeout_s
    try:
        async with httpx.AsyncClient(follow_redirects=True, max_redirects=3, timeout=timeout_s) as client:
            async with client.stream("GET", url, headers={"Accept": "image/*"}) as response:
                if response.status_code != 200:
                    raise ImageError(f"fetching the image {url} gave HTTP {response.status_code}")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        raise ImageError(f"the image at {url} is over the limit of {max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise ImageError(f"fetching the image {url} took over {timeout_s:g} s")
                return bytes(data)
    except httpx.HTTPError as e:
        raise ImageError(f"cannot fetch the image {url}: {type(e).__name__}: {e}") from None


async def fetch_message_images(messages: list[dict[str, Any]], *, max_bytes: int,
                               timeout_s: float) -> list[dict[str, Any]] | None:
    """The messages with each http(s) image URL replaced by its bytes (fetched at once, under
    `timeout_s` in all), or None when they hold no such URL."""
    urls: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
                url = _url(part)
                if isinstance(url, str) and url.startswith(("http://", "https://")):
                    urls.append(url)
    if not urls:
        return None
    try:
        fetched = await asyncio.wait_for(
            asyncio.gather(*(fetch_image(u, max_bytes=max_bytes, timeout_s=timeout_s) for u in dict.fromkeys(urls))),
            timeout_s)
    except asyncio.TimeoutError:
        raise ImageError(f"fetching the request's images took over {timeout_s:g} s") from None
    data = dict(zip(dict.fromkeys(urls), fetched))
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            content = [{"type": "image", "image": data[_url(p)]}
                       if isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES and _url(p) in data else p
                       for p in content]
            message = {**message, "content": content}
        out.append(message)
    return out


def _url(part: dict[str, Any]) -> Any:
    value = part.get("image") if part.get("type") == "image" else part.get("image_url")
    return value.get("url") if isinstance(value, dict) else value
