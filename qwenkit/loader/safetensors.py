"""Hugging Face safetensors checkpoints: one `model.safetensors` or sharded with an index."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
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
        with _open(path) as f:  # validates the file
            if lazy:
                data_start, entries = _header(path)
                for name in f.keys():
                    yield name, SafetensorsTensor(path, data_start, entries[name])
            else:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# What pre-quantized checkpoints store besides floats: packed integers, e4m3 weights, shapes.
_DTYPES = {**_FLOATS, "F8_E4M3": torch.float8_e4m3fn, "I32": torch.int32, "I64": torch.int64, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8}


def _header(path: Path) -> tuple[int, dict]:
    """(offset of the data, {name: {"dtype", "shape", "data_offsets"}}) of a safetensors file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        entries = json.loads(f.read(size))
        entries.pop("__metadata__", None)
        return 8 + size, entries


def stored_tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (safetensors dtype such as "BF16" or "I32", shape)} of every tensor, from the
    files' headers alone (what a pre-quantized load plans its modules from)."""
    tensors = {}
    for path in safetensors_files(folder):
        with _open(path):  # validates the file
            for name, entry in _header(path)[1].items():
                tensors[name] = (entry["dtype"], tuple(entry["shape"]))
    return tensors


class SafetensorsTensor:
    """One tensor of a safetensors file, read a block of rows (dim 0) at a time with file
    reads: a memory map (what safetensors gives) would keep every page read resident for
    the whole load, i.e. the whole checkpoint next to its quantized copy."""

    def __init__(self, path: Path, data_start: int, entry: dict):
        if entry["dtype"] not in _DTYPES:
            raise ModelLoadError(f"{path}: tensor dtype {entry['dtype']} is not one qwenkit reads")
        self.path, self.dtype, self.shape = path, _DTYPES[entry["dtype"]], tuple(entry["shape"])
        self._offset = data_start + entry["data_offsets"][0]
        self._row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) in float32."""
        return self._read(start, stop).float()

    def read(self) -> torch.Tensor:
        """The whole tensor in its stored dtype (packed integers, e4m3, ...)."""
        return self._read(0, self.shape[0] if self.shape else 1).view(self.shape)

    def _read(self, start: int, stop: int) -> torch.Tensor:
        count = (stop - start) * self._row_bytes
        raw = np.fromfile(self.path, dtype=np.uint8, count=count, offset=self._offset + start * self._row_bytes)
        if raw.size != count:
            raise ModelLoadError(f"{self.path}: file ends inside a tensor")
        if not count:
            return torch.empty(stop - start, *self.shape[1:], dtype=self.dtype)
        return torch.frombuffer(raw, dtype=self.dtype).view(stop - start, *self.shape[1:])


def count_tensors(folder: Path) -> int:
    """How many tensors the checkpoint holds (for the progress bar)."""
    total = 0
    for path in safetensors_files(folder):
        with _open(path) as f:
            total += len(f.keys())
    return total
