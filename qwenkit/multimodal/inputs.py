"""A prompt with images, as the engine takes it.

The chat template writes one `<|image_pad|>` per image; `build_multimodal_prompt` repeats it
once per token the vision tower makes of that image (t * h * w / merge_size^2), so that the KV
budget, the scheduler's chunks and the block tables count image tokens as any other. Each
image's embeddings later replace its run of placeholders (`EncoderCache`, run by the
ModelRunner once per image, whatever the chunking).

M-RoPE positions are computed as transformers' `get_rope_index` does: text tokens count up by
one (the same number for time, row and column); an image's tokens get (start, start + row,
start + column) over its merged grid, and the text after it resumes at start + max(rows,
columns). A generated token at index i is at position i + rope_delta on all three axes.

The prefix cache keys blocks by their tokens; a block that holds image tokens also carries the
images' content hashes (`MultimodalPrompt.keys_in`), so two prompts with the same placeholders
but different images never share a cached block.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qwenkit.multimodal.image import ImageError, ImageProcessor


@dataclass(frozen=True, eq=False)
class ImageInput:
    """One preprocessed image: its patches, their grid, its content hash and how many tokens it takes."""

    pixel_values: torch.Tensor  # float32 [t * h * w, 3 * T * P * P]
    grid_thw: tuple[int, int, int]
    content_hash: int
    num_tokens: int

    @classmethod
    def from_image(cls, image, processor: ImageProcessor) -> "ImageInput":
        """From an RGB PIL image."""
        pixels, grid = processor.preprocess(image)
        return cls.from_pixels(pixels, grid, merge_size=processor.merge_size)

    @classmethod
    def from_pixels(cls, pixels: np.ndarray, grid: tuple[int, int, int], *, merge_size: int) -> "ImageInput":
        digest = hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.float32).tobytes())
        digest.update(repr(tuple(grid)).encode())
        t, h, w = grid
        return cls(torch.from_numpy(np.array(pixels, dtype=np.float32)), tuple(grid),
                   int.from_bytes(digest.digest()[:8], "little"), t * h * w // merge_size**2)


@dataclass(frozen=True, eq=False)
class MultimodalPrompt:
    """The images of a prompt, where their tokens start, and the prompt's M-RoPE positions."""

    images: tuple[ImageInput, ...]
    offsets: tuple[int, ...]  # index in the prompt of each image's first token
    positions: torch.Tensor  # int64 [3, num_prompt_tokens]
    rope_delta: int  # a token at index i >= num_prompt_tokens is at position i + rope_delta

    @property
    def num_prompt_tokens(self) -> int:
        return self.positions.shape[1]

    def positions_of(self, start: int, end: int) -> torch.Tensor:
        """int64 [3, end - start]: the positions of tokens start..end-1 (prompt or generated)."""
        n = self.num_prompt_tokens
        parts = [self.positions[:, start:min(end, n)]] if start < n else []
        if end > n:
            parts.append((torch.arange(max(start, n), end) + self.rope_delta).expand(3, -1))
        return torch.cat(parts, dim=1)

    def keys_in(self, start: int, end: int) -> tuple[int, ...]:
        """Content hashes of the images with tokens in start..end-1 (the prefix cache's extra key)."""
        return tuple(image.content_hash for image, o in zip(self.images, self.offsets)
                     if o < end and o + image.num_tokens > start)

    def pieces(self, start: int, end: int) -> list[tuple[int, ImageInput, int, int]]:
        """(first prompt index, image, first row, end row) of each image's embeddings among tokens start..end-1."""
        out = []
        for image, o in zip(self.images, self.offsets):
            lo, hi = max(start, o), min(end, o + image.num_tokens)
            if lo < hi:
                out.append((lo, image, lo - o, hi - o))
        return out


def build_multimodal_prompt(
    token_ids: Sequence[int],
    images: Sequence[ImageInput],
    *,
    image_token_id: int,
    merge_size: int,
) -> tuple[list[int], MultimodalPrompt]:
    """Expand each `image_token_id` of `token_ids` (one per image, in order) to its image's
    token count; return the new ids and their MultimodalPrompt."""
    slots = [i for i, t in enumerate(token_ids) if t == image_token_id]
    if len(slots) != len(images):
        raise ImageError(f"the prompt has {len(slots)} image placeholders but {len(images)} images were given")
    ids: list[int] = []
    offsets: list[int] = []
    columns: list[torch.Tensor] = []
    pos, last = 0, 0
    for slot, image in zip(slots, images):
        text = slot - last
        if text:
            columns.append((torch.arange(text) + pos).expand(3, -1))
            pos += text
        ids.extend(token_ids[last:slot])
        offsets.append(len(ids))
        ids.extend([image_token_id] * image.num_tokens)
        t, h, w = image.grid_thw
        gh, gw = h // merge_size, w // merge_size
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        columns.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
        pos += max(gh, gw)
        last = slot + 1
    rest = len(token_ids) - last
    if rest:
        columns.append((torch.arange(rest) + pos).expand(3, -1))
    ids.extend(token_ids[last:])
    positions = torch.cat(columns, dim=1).long().contiguous()
    delta = int(positions.max()) + 1 - len(ids)
    return ids, MultimodalPrompt(tuple(images), tuple(offsets), positions, delta)


class EncoderCache:
    """The vision tower's output per image content hash, least recently used dropped first once
    more than `max_tokens` image tokens are held: a repeated image (a later turn of the same
    conversation, n > 1 completions, a preempted sequence) is encoded once."""

    def __init__(self, encode: Callable[[torch.Tensor, list[tuple[int, int, int]]], list[torch.Tensor]],
                 *, max_tokens: int = 65536):
        self.encode = encode
        self.max_tokens = max_tokens
        self.entries: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.num_encoded = 0  # images run through the tower (tests read it)

    def get(self, images: Sequence[ImageInput]) -> dict[int, torch.Tensor]:
        """Embeddings [num_tokens, hidden] of each image by hash; the missing ones encoded in one call."""
        missing: dict[int, ImageInput] = {}
        for image in images:
            if image.content_hash in self.entries:
                self.entries.move_to_end(image.content_hash)
            else:
                missing.setdefault(image.content_hash, image)
        if missing:
            todo = list(missing.values())
            pixels = torch.cat([image.pixel_values for image in todo])
            outs = self.encode(pixels, [image.grid_thw for image in todo])
            self.num_encoded += len(todo)
            for image, out in zip(todo, outs):
                self.entries[image.content_hash] = out
        found = {image.content_hash: self.entries[image.content_hash] for image in images}
        held = sum(e.shape[0] for e in self.entries.values())
        while held > self.max_tokens and len(self.entries) > len(found):
            key = next(k for k in self.entries if k not in found)
            held -= self.entries.pop(key).shape[0]
        return found
