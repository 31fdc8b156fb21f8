"""Decode an image the user sent, refusing what would harm the server, and turn it into the
vision tower's patches exactly as transformers' Qwen2-VL image processor (PIL backend) does.

Preprocessing (`ImageProcessor.preprocess`): convert to RGB (transparency composited on white),
`smart_resize` to a multiple of patch_size * merge_size within [min_pixels, max_pixels] keeping
the aspect ratio, PIL bicubic resize, x / 255 (in float64, then float32), (x - mean) / std, and the
patches laid out merge block by merge block, each repeated `temporal_patch_size` times (a still
image is a clip of identical frames). tests/test_vision.py holds the result equal to
transformers' processor.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwenkit.errors import QwenkitError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(QwenkitError, ValueError):
    """An image that cannot be used: undecodable, truncated, too large, or not allowed."""


@dataclass(frozen=True)
class ImageLimits:
    """What a request's image may be. max_bytes: the encoded file; max_pixels: width x height as
    decoded (a decompression bomb is refused before its pixels are allocated); max_images: per request."""

    max_bytes: int = 20 << 20
    max_pixels: int = 64 << 20
    max_images: int = 16


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()):
    """A fully decoded RGB `PIL.Image` from encoded bytes; ImageError says what is wrong."""
    from PIL import Image

    if len(data) > limits.max_bytes:
        raise ImageError(f"the image is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    if not data:
        raise ImageError("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ImageError(f"the image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels")
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"the image is too large to decode (more than {limits.max_pixels} pixels)") from None
    except Image.UnidentifiedImageError:
        raise ImageError("the image data is not an image format qwenkit can read (PNG, JPEG, WebP, GIF, BMP, ...)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"the image could not be decoded ({e})") from None
    if min(image.size) < 1:
        raise ImageError("the image has no pixels")
    return to_rgb(image)


def to_rgb(image):
    """RGB, any transparency composited onto white (transformers' `convert_to_rgb`)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def load_image_source(source: Any, limits: ImageLimits = ImageLimits(), *, allow_files: bool = False):
    """An image from what a message part carries: a `data:image/...;base64,` URL, raw bytes, a
    PIL image, or (allow_files: the CLI and `LLM`, never the server) a local path or file:// URL.
    http(s) URLs are fetched by the server (qwenkit/multimodal/fetch.py), not here."""
    from PIL import Image

    if isinstance(source, Image.Image):
        if source.width * source.height > limits.max_pixels:
            raise ImageError(f"the image is {source.width}x{source.height} pixels; the limit is {limits.max_pixels}")
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray)):
        return decode_image(bytes(source), limits)
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str):
        raise ImageError(f"an image must be a data: URL, bytes or a PIL image, got {type(source).__name__}")
    if source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep or ";base64" not in header:
            raise ImageError("an image data: URL must be base64 (data:image/png;base64,...)")
        if len(payload) > limits.max_bytes * 4 // 3 + 4:
            raise ImageError(f"the image is over the limit of {limits.max_bytes} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("the image data: URL is not valid base64") from None
        return decode_image(data, limits)
    if source.startswith(("http://", "https://")):
        raise ImageError(f"image URLs are not fetched: send the image inline as a data: URL (a server fetches "
                         f"http(s) URLs only when started with --allow-image-urls): {source[:100]}")
    if allow_files:
        path = Path(source.removeprefix("file://"))
        try:
            size = path.stat().st_size
        except OSError as e:
            raise ImageError(f"cannot read the image {source}: {e.strerror or e}") from None
        if size > limits.max_bytes:
            raise ImageError(f"the image {source} is {size} bytes; the limit is {limits.max_bytes} bytes")
        return decode_image(path.read_bytes(), limits)
    raise ImageError("an image must be a data: URL (data:image/png;base64,...)")


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width), both multiples of `factor`, within [min_pixels, max_pixels], the aspect
    ratio kept as near as may be (transformers' `smart_resize`)."""
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"the image's aspect ratio must be under 200:1, got {width}x{height}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class ImageProcessor:
    """The checkpoint's `preprocessor_config.json` (Qwen2-VL image processor)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_hf(cls, d: dict[str, Any], **defaults: Any) -> "ImageProcessor":
        """From a parsed preprocessor_config.json; `defaults` (the vision config's patch sizes) fill what it lacks."""
        size = d.get("size") or {}
        values = dict(defaults)
        values["min_pixels"] = d.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or cls.min_pixels
        values["max_pixels"] = d.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or cls.max_pixels
        for key in ("patch_size", "temporal_patch_size", "merge_size"):
            if d.get(key) is not None:
                values[key] = int(d[key])
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                values[key] = tuple(float(v) for v in d[key])
        return cls(**values)

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) in patches of an image of height x width pixels."""
        h, w = smart_resize(height, width, factor=self.patch_size * self.merge_size,
                            min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return 1, h // self.patch_size, w // self.patch_size

    def preprocess(self, image) -> tuple[np.ndarray, tuple[int, int, int]]:
        """An RGB PIL image -> (float32 patches [t * h * w, 3 * T * P * P], grid (t, h, w))."""
        from PIL import Image

        _, gh, gw = self.grid(image.height, image.width)
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        resized = image.resize((gw * p, gh * p), resample=Image.Resampling.BICUBIC)
        pixels = (np.asarray(resized, dtype=np.float64) * (1 / 255)).astype(np.float32)
        pixels = (pixels - np.array(self.image_mean, dtype=np.float32)) / np.array(self.image_std, dtype=np.float32)
        pixels = pixels.transpose(2, 0, 1)  # [C, H, W]
        c = pixels.shape[0]
        patches = pixels.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], tp, p, p))
        return np.ascontiguousarray(patches.reshape(gh * gw, c * tp * p * p)), (1, gh, gw)
