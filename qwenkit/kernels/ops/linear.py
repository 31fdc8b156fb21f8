"""Matmuls by quantized weights (int8, GGUF blocks, int4), and the row limits of their kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwenkit.kernels import cpu, reference
from qwenkit.kernels.batch_invariance import in_row_blocks
from qwenkit.kernels.cpu import DEQUANTIZED_BLOCKS, GGUF_BLOCKS, PACKED_ROWS
from qwenkit.kernels.ops import Op


# Row limits of the quantized matmuls on CPU. The native kernels take calls of any size with
# float32 activations (they beat dequantize + GEMM at every size measured: docs/quantization.md)
# and of at most MAX_KERNEL_TOKENS rows with half-precision ones: those mean a CPU with AMX /
# AVX512-BF16 (the default dtype there), whose bfloat16 GEMM is expected to beat integer kernels
# on prefill. Without the native kernels, torch's bfloat16-activation int8 kernel takes up to
# MAX_KERNEL_TOKENS rows (it beats dequantizing only that far); larger calls dequantize a block
# of rows at a time and run a GEMM in the activations' dtype.
MAX_NATIVE_KERNEL_TOKENS = 1 << 30
MAX_KERNEL_TOKENS = 16


# GGUF types whose native kernel computes each row alike at any row count under
# `batch_invariant()`, through `set_row_invariant` (as the int8 kernel does: their decode paths at
# every row count; prefill through them beats dequantizing for a float GEMM, docs/quantization.md).
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
NATIVE_ROW_INVARIANT = frozenset({"Q5_0", *K_QUANTS})


def _native_any_rows(x: torch.Tensor) -> bool:
    """Whether the native quantized kernels take x's rows whatever their count (float32 on CPU)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and cpu.library() is not None


def _native_rows(x: torch.Tensor) -> bool:
    """Whether a CPU call of x's rows goes to the native kernels (see MAX_NATIVE_KERNEL_TOKENS)."""
    limit = MAX_NATIVE_KERNEL_TOKENS if x.dtype == torch.float32 else MAX_KERNEL_TOKENS
    return x.device.type == "cpu" and x.shape[0] <= limit


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ (weight int8 [N, K] * scale bfloat16 [N])^T, in x's dtype."""
    if x.device.type == "cpu" and torch.compiler.is_compiling():
        return _int8_linear_op(x, weight, scale)
    return in_row_blocks(lambda rows: _int8_linear(rows, weight, scale), x, invariant=_native_any_rows(x))


def _int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if _native_rows(x) and (lib := cpu.library()) is not None:
        return lib.int8_linear(x, weight, scale).to(x.dtype)
    if x.device.type == "cpu" and x.shape[0] <= MAX_KERNEL_TOKENS:  # torch's int8 kernel (bfloat16 activations)
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), weight, scale).to(x.dtype)
    return reference.int8_linear(x, weight, scale)


@torch.library.custom_op("qwenkit::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _int8_linear(x, weight, scale)


@_int8_linear_op.register_fake
def _(x, weight, scale):
    return x.new_empty(x.shape[0], weight.shape[0])


def has_gguf_kernel(type_name: str) -> bool:
    """Whether GGUF `type_name` blocks are multiplied as they are here (a native kernel runs)."""
    return type_name in GGUF_BLOCKS and cpu.library() is not None


def gguf_linear(x: torch.Tensor, blocks: torch.Tensor, in_features: int, type_name: str) -> torch.Tensor:
    """x [T, K] @ w^T with w as GGUF rows of `type_name` in the kernels' layout (`gguf_pack`;
    uint8 [N, bytes per row]), in x's dtype: the native kernel on CPU; elsewhere (and past the
    row limit) the blocks are dequantized a block of rows at a time and multiplied in x's dtype."""
    if x.device.type == "cpu" and torch.compiler.is_compiling():
        return _gguf_linear_op(x, blocks, in_features, type_name)
    return in_row_blocks(lambda rows: _gguf_linear(rows, blocks, in_features, type_name), x,
                          invariant=type_name in NATIVE_ROW_INVARIANT and _native_any_rows(x))


def _gguf_linear(x: torch.Tensor, blocks: torch.Tensor, in_features: int, type_name: str) -> torch.Tensor:
    if _native_rows(x) and type_name in GGUF_BLOCKS and (lib := cpu.library()) is not None:
        return lib.gguf_linear(x, blocks, in_features, type_name).to(x.dtype)
    return _dequantized_gguf_linear(x, blocks, in_features, type_name)


def packed_row_step(type_name: str, in_features: int) -> int:
    """Rows of `type_name` blocks to take at a time for about `reference.BLOCK_VALUES` values: whole
    groups of the rows its layout packs together (`PACKED_ROWS`; Q5_0: 8)."""
    together = PACKED_ROWS[type_name]
    return max(together, reference.BLOCK_VALUES // in_features // together * together)


def _dequantized_gguf_linear(x: torch.Tensor, blocks: torch.Tensor, in_features: int, type_name: str) -> torch.Tensor:
    out = x.new_empty(x.shape[0], blocks.shape[0])
    step = packed_row_step(type_name, in_features)
    for start in range(0, blocks.shape[0], step):
        rows = gguf_dequantize(blocks[start : start + step], in_features, type_name, x.dtype)
        out[:, start : start + step] = F.linear(x, rows.to(x.device))
    return out


@torch.library.custom_op("qwenkit::gguf_linear", mutates_args=())
def _gguf_linear_op(x: torch.Tensor, blocks: torch.Tensor, in_features: int, type_name: str) -> torch.Tensor:
    return _gguf_linear(x, blocks, in_features, type_name)


@_gguf_linear_op.register_fake
def _(x, blocks, in_features, type_name):
    return x.new_empty(x.shape[0], blocks.shape[0])


def gguf_pack(blocks: torch.Tensor, in_features: int, type_name: str) -> torch.Tensor:
    """A file's GGUF rows of `type_name` (uint8 [N, bytes per row]) -> the layout `gguf_linear` and
    `gguf_dequantize` take, the same size: Q5_0 8 rows interleaved, a row a vector lane (N a
    multiple of 8; csrc/quant.c), the K-quants as stored."""
    if blocks.device.type == "cpu" and type_name in GGUF_BLOCKS and (lib := cpu.library()) is not None:
        return lib.gguf_pack(blocks, in_features, type_name)
    return reference.gguf_pack(blocks, in_features, type_name)


def gguf_dequantize(blocks: torch.Tensor, in_features: int, type_name: str,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GGUF rows of `type_name` in the kernels' layout (`gguf_pack`; Q8_0, which has no matmul
    kernel, as stored; uint8 [N, bytes per row]) -> [N, in_features] of `dtype` on the CPU, exactly
    as gguf dequantizes them (then rounded to a 16-bit dtype as torch's .to() rounds)."""
    if blocks.device.type == "cpu" and type_name in DEQUANTIZED_BLOCKS and (lib := cpu.library()) is not None:
        return lib.gguf_dequantize(blocks, in_features, type_name, dtype)
    return reference.gguf_dequantize(blocks, in_features, type_name, dtype)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ w^T with w packed by torch's `_convert_weight_to_int4pack_for_cpu`, in x's dtype
    (torch's own CPU kernel: the packed layout is torch's)."""
    return in_row_blocks(lambda rows: reference.int4_linear(rows, packed, scales_and_zeros), x)


OPS = {
    "int8_linear": Op(int8_linear, cpu=cpu.Library.int8_linear, reference=reference.int8_linear),
    "gguf_linear": Op(gguf_linear, cpu=cpu.Library.gguf_linear),
    "gguf_pack": Op(gguf_pack, cpu=cpu.Library.gguf_pack, reference=reference.gguf_pack),
    "gguf_dequantize": Op(gguf_dequantize, cpu=cpu.Library.gguf_dequantize, reference=reference.gguf_dequantize),
    "int4_linear": Op(int4_linear, reference=reference.int4_linear),
}
