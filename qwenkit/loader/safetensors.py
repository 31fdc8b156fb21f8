"""Hugging Face safetensors checkpoints: one `model.safetensors` or sharded with an index."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from qwenkit.config import read_json
from qwenkit.errors import ModelLoadError


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of `folder`: those the index names, else every `*.safetensors`."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map") or {}
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelLoadError(
                f"{folder}: shards named in model.safetensors.index.json are missing: {', '.join(missing)}"
            )
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weights")
    return files


@contextmanager
def _open(path: Path):
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except (OSError, SafetensorError) as e:  # truncated or corrupt files
        raise ModelLoadError(f"{path}: cannot read safetensors file ({e})") from None


def iter_safetensors(
    folder: Path, dtype: torch.dtype, *, lazy: bool = False
) -> Iterator[tuple[str, torch.Tensor | SafetensorsTensor]]:
    """Yield `(hf_name, tensor)` for every tensor, converted to `dtype` one at a time; with
    `lazy`, as a `SafetensorsTensor` valid until the next one is asked for."""
    for path in safetensors_files(folder):
        with _open(path) as f:
            for name in f.keys():
                yield name, SafetensorsTensor(f, name) if lazy else f.get_tensor(name).to(dtype)


class SafetensorsTensor:
    """One tensor of an open safetensors file, read a block of rows (dim 0) at a time."""

    def __init__(self, file, name: str):
        self._slice = file.get_slice(name)
        self.shape = tuple(self._slice.get_shape())

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) in float32."""
        return self._slice[start:stop].float()


def count_tensors(folder: Path) -> int:
    """How many tensors the checkpoint holds (for the progress bar)."""
    total = 0
    for path in safetensors_files(folder):
        with _open(path) as f:
            total += len(f.keys())
    return total
