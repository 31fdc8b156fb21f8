"""The GGUF file format's header: the metadata and the tensor table, read with `struct`.

Rather than with `gguf.GGUFReader`: the reader builds a numpy view for each of the ~300k
vocabulary and merge strings, which takes 13 s for a Qwen vocabulary on a small machine,
against well under one second this way. No torch: `qwenkit list` and `show` read a GGUF's
header without loading the engine; :mod:`qwenkit.loader.gguf` reads the rest.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from qwenkit.errors import ModelLoadError

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the file's tensor table."""

    name: str
    shape: tuple[int, ...]  # in torch order: GGUF lists the fastest-moving dimension first
    tensor_type: GGMLQuantizationType
    start: int  # absolute byte offset in the file
    num_bytes: int


# -- file format ---------------------------------------------------------------------------


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """`(metadata, {gguf_name: TensorInfo})`, checking that every tensor's data is in the file."""
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ModelLoadError(f"{path}: is a directory, not a GGUF file") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot be read ({e.strerror})") from None
    with file:
        file_size = os.fstat(file.fileno()).st_size
        if file.read(4) != _MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file (it does not start with the magic bytes 'GGUF')")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as blob:
            try:
                metadata, entries, end_of_table = _parse_tables(blob, path)
            except (struct.error, ValueError, UnicodeDecodeError) as e:
                raise ModelLoadError(f"{path}: truncated or corrupt GGUF header ({e})") from None

    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    # As llama.cpp checks it: the tensor data starts at a multiple of it.
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1 or alignment & (alignment - 1):
        raise ModelLoadError(f"{path}: corrupt GGUF header: general.alignment is {alignment!r}, "
                             "not a power of two")
    data_start = (end_of_table + alignment - 1) // alignment * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, dims, type_id, offset in entries:
        try:
            tensor_type = GGMLQuantizationType(type_id)
        except ValueError:
            raise ModelLoadError(f"{path}: tensor {name} has unknown ggml type id {type_id}") from None
        block_size, type_size = GGML_QUANT_SIZES[tensor_type]
        if dims and dims[0] % block_size:
            raise ModelLoadError(
                f"{path}: tensor {name} has rows of {dims[0]} values, not a multiple of the "
                f"{tensor_type.name} block size {block_size}"
            )
        num_bytes = math.prod(dims) // block_size * type_size
        tensors[name] = TensorInfo(name, tuple(reversed(dims)), tensor_type, data_start + offset, num_bytes)

    if tensors:
        last = max(tensors.values(), key=lambda info: info.start + info.num_bytes)
        if last.start + last.num_bytes > file_size:
            raise ModelLoadError(
                f"{path}: truncated GGUF file: tensor {last.name} ends at byte "
                f"{last.start + last.num_bytes} but the file has {file_size} bytes (incomplete download?)"
            )
    return metadata, tensors


def _parse_tables(blob: mmap.mmap, path: Path) -> tuple[dict[str, Any], list[tuple], int]:
    """The metadata, the raw tensor table `[(name, dims, type_id, offset)]`, and where it ends."""
    version, tensor_count, metadata_count = struct.unpack_from("<IQQ", blob, 4)
    if version not in _SUPPORTED_VERSIONS:
        raise ModelLoadError(f"{path}: GGUF version {version} is not supported (qwenkit reads versions 2 and 3)")
    pos = 24
    metadata: dict[str, Any] = {}
    for _ in range(metadata_count):
        key, pos = _read_string(blob, pos)
        (value_type,) = struct.unpack_from("<I", blob, pos)
        metadata[key], pos = _read_value(blob, pos + 4, value_type)
    entries = []
    for _ in range(tensor_count):
        name, pos = _read_string(blob, pos)
        (num_dims,) = struct.unpack_from("<I", blob, pos)
        dims = struct.unpack_from(f"<{num_dims}Q", blob, pos + 4)
        type_id, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * num_dims)
        pos += 4 + 8 * num_dims + 12
        entries.append((name, dims, type_id, offset))
    return metadata, entries, pos


_U64 = struct.Struct("<Q")


def _read_string(blob: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    end = pos + 8 + length
    if end > len(blob):
        raise ValueError(f"a string at byte {pos} runs past the end of the file")
    return blob[pos + 8 : end].decode("utf-8"), end


def _read_value(blob: mmap.mmap, pos: int, value_type: int) -> tuple[Any, int]:
    if value_type == GGUFValueType.STRING:
        return _read_string(blob, pos)
    if value_type == GGUFValueType.ARRAY:
        element_type, count = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if element_type == GGUFValueType.STRING:
            # The vocabulary and merges (~300k strings): one loop without a call per string, the
            # bytes decoded after (about half the time of _read_string for each).
            unpack, size, raw = _U64.unpack_from, len(blob), [b""] * count
            for i in range(count):
                (length,) = unpack(blob, pos)
                pos += 8
                if pos + length > size:
                    raise ValueError(f"a string at byte {pos - 8} runs past the end of the file")
                raw[i] = blob[pos : pos + length]
                pos += length
            return [value.decode("utf-8") for value in raw], pos
        if element_type not in _SCALAR_FORMATS:
            raise ValueError(f"an array of value type {element_type} is not supported")
        fmt = _SCALAR_FORMATS[element_type]
        values = list(struct.unpack_from(f"<{count}{fmt[1]}", blob, pos))
        return values, pos + count * struct.calcsize(fmt)
    if value_type not in _SCALAR_FORMATS:
        raise ValueError(f"unknown metadata value type {value_type}")
    fmt = _SCALAR_FORMATS[value_type]
    (value,) = struct.unpack_from(fmt, blob, pos)
    if value_type == GGUFValueType.FLOAT32:
        # The shortest decimal that rounds to this float32: 1e-06, not 9.999999974752427e-07.
        value = float(str(np.float32(value)))
    return value, pos + struct.calcsize(fmt)
