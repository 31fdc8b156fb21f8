"""A same-shape stand-in for a GGUF, small enough to carry where the model cannot be fetched.

    python benchmarks/gguf_shape_copy.py MODEL.gguf OUT.gguf.xz [--period-bytes 65536]

Keeps the file's header verbatim (metadata, tokenizer, tensor table, alignment) and every
tensor's type and shape, but fills each tensor with its own first rows repeated (as many whole
rows as fit in `--period-bytes`, at least one), then compresses the file with xz. The repeats
compress away: the embedded default model (491 MB) becomes 12 MiB, which a machine with no
network can take along and unpack with the standard library:

    python -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
        IN.xz OUT.gguf

Every kernel reads the same bytes per token as on the real model, so speed and memory
figures carry over; the weights are real blocks, so activations keep real magnitudes. What
it says is nonsense: quality figures (perplexity, greedy agreement) taken on it compare two
engines on the same nonsense model, not either engine's quality.
"""

from __future__ import annotations

import argparse
import lzma
import sys
from pathlib import Path

import gguf


def shape_copy(src: Path, dst: Path, period_bytes: int) -> None:
    reader = gguf.GGUFReader(src)
    raw = reader.data  # the whole file, memory-mapped (numpy uint8)
    out = bytearray(raw[: reader.data_offset].tobytes())  # header, verbatim
    for tensor in sorted(reader.tensors, key=lambda t: t.data_offset):
        start, size = int(tensor.data_offset), int(tensor.n_bytes)
        out += bytes(start - len(out))  # alignment padding between tensors
        rows = int(tensor.shape[1]) if len(tensor.shape) > 1 else 1
        row_bytes = size // rows
        period = max(1, period_bytes // row_bytes) * row_bytes if rows > 1 else size
        seed = raw[start : start + min(period, size)].tobytes()
        out += (seed * (size // len(seed) + 1))[:size]
    out += bytes(len(raw) - len(out))  # trailing padding, if any
    with lzma.open(dst, "wb", preset=6) as f:
        f.write(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--period-bytes", type=int, default=65536, help="bytes of first rows repeated per tensor")
    args = parser.parse_args()
    shape_copy(args.model, args.out, args.period_bytes)
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.1f} MiB (from {args.model.stat().st_size / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
