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
