"""Image parts of chat messages, in the shapes clients send them, pulled out before the chat
template renders: each becomes `{"type": "image"}` (what the Qwen-VL templates turn into
`<|vision_start|><|image_pad|><|vision_end|>`) and its source is returned, in prompt order.

Shapes read: OpenAI chat `{"type": "image_url", "image_url": {"url": ...}}` (or the url as a
string), the Responses API's `{"type": "input_image", "image_url": ...}`, and transformers' /
qwen-vl-utils' `{"type": "image", "image": ...}`.
"""

from __future__ import annotations

from typing import Any

IMAGE_PART_TYPES = ("image_url", "input_image", "image")


def image_source(part: dict[str, Any], where: str) -> Any:
    """What an image part carries (a URL string, bytes or a PIL image); ValueError names a malformed part."""
    kind = part.get("type")
    value = part.get("image") if kind == "image" else part.get("image_url")
    if isinstance(value, dict):
        value = value.get("url")
    if value is None or (isinstance(value, str) and not value):
        field = "image" if kind == "image" else "image_url.url" if kind == "image_url" else "image_url"
        raise ValueError(f"{where}: an {kind} part needs '{field}'")
    return value


def extract_images(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """(messages with each image part as {"type": "image"}, the image sources in order)."""
    out, sources = [], []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list) or not any(
                isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES for p in content):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
                sources.append(image_source(part, f"messages[{i}].content[{j}]"))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append({**message, "content": parts})
    return out, sources


def has_images(messages: Any) -> bool:
    """Whether any message has an image part (cheap; no decoding)."""
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES for p in m["content"])
        for m in messages)


TEXT_PART_TYPES = ("text", "input_text", "output_text")


def protocol_content(content: list[Any], where: str) -> str | list[dict[str, Any]]:
    """A protocol message's list of parts as the engine takes it: the text joined when there is no
    image, else text and image parts in order, each image a `data:` or http(s) URL (never a path;
    an http(s) URL is fetched by the server only with --allow-image-urls, qwenkit/multimodal/fetch.py).
    ValueError names the part at fault."""
    texts_only = True
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PART_TYPES:
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{where}[{j}]: a text part needs a string 'text'")
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image_url", "input_image"):
            if kind == "input_image" and part.get("file_id") is not None and part.get("image_url") is None:
                raise ValueError(f"{where}[{j}]: input_image by file_id is not supported; send image_url as a data: URL")
            url = image_source(part, f"{where}[{j}]")
            if not isinstance(url, str):
                raise ValueError(f"{where}[{j}]: the image URL must be a string")
            if not url.startswith(("data:", "http://", "https://")):
                raise ValueError(f"{where}[{j}]: an image must be a data: URL (data:image/png;base64,...) "
                                 "or, where the server allows it, an http(s) URL")
            parts.append({"type": "image_url", "image_url": {"url": url}})
            texts_only = False
        else:
            raise ValueError(f"{where}[{j}]: only text and image parts are supported, got a {kind!r} part")
    if texts_only:
        return "".join(p["text"] for p in parts)
    return parts
