"""Batch invariance: CPU matmuls that compute each row as it would be computed alone.

A matmul library picks its blocking, vector kernel and thread split from the shape, so a row's
numbers depend on how many rows came with it (measured with torch 2.13's CPU GEMM: a row of a
1-, 2-, 3-, 5-, 6-, 7- or 9-row call differs from the same row in a 300-row call; the native
Q5_0 and K-quant kernels unpack the weights from 16 rows on, the K-quants' AVX-512 path from
64). Under `batch_invariant()` the native int8, Q5_0 and K-quant kernels (float32 activations)
take one path for every row count (`cpu.Library.set_row_invariant`, `NATIVE_ROW_INVARIANT`),
and every other CPU matmul is called on blocks of exactly INVARIANT_ROWS rows (the last one
zero-padded): a block's shape never changes, and no GEMM mixes its rows, so each row's numbers
are those of the row alone.
With attention per query token (the runner's deterministic steps) and row-wise norms, a token
is computed alike alone, in any batch, chunked or not, and with or without a prefix-cache hit.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from qwenkit.kernels import cpu

INVARIANT_ROWS = 8
_batch_invariant = contextvars.ContextVar("qwenkit_batch_invariant", default=False)


@contextlib.contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """Within the block, CPU matmuls compute each row as it would be computed alone."""
    token = _batch_invariant.set(enabled)
    lib = cpu.library() if enabled else None
    if lib is not None:
        lib.set_row_invariant(True)
    try:
        yield
    finally:
        if lib is not None:
            lib.set_row_invariant(False)
        _batch_invariant.reset(token)


def is_batch_invariant() -> bool:
    return _batch_invariant.get()


def in_row_blocks(matmul: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
                  invariant: bool = False) -> torch.Tensor:
    """matmul(x), called on blocks of exactly INVARIANT_ROWS rows of x when batch invariance is
    on (CPU, eager), else (or where the matmul is `invariant` at any row count) on x whole."""
    # is_compiling first: dynamo folds it, and cannot trace ContextVar.get (compiled steps are never invariant).
    if (torch.compiler.is_compiling() or invariant or not _batch_invariant.get() or x.device.type != "cpu"
            or x.dim() != 2):
        return matmul(x)
    rows = x.shape[0]
    padded = -(-rows // INVARIANT_ROWS) * INVARIANT_ROWS
    if padded != rows:
        x = torch.cat([x, x.new_zeros(padded - rows, x.shape[1])])
    x = x.contiguous()
    return torch.cat([matmul(x[i : i + INVARIANT_ROWS]) for i in range(0, padded, INVARIANT_ROWS)])[:rows]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear of float weights; row by row alike under `batch_invariant()`."""
    return in_row_blocks(lambda rows: F.linear(rows, weight, bias), x)
