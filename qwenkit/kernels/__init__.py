"""The kernels model code calls, and the one place that decides which implementation runs.

Each function takes and returns tensors and picks its implementation from the tensors'
device and dtype, so model code never asks what it runs on:

- **CPU**: C kernels (`csrc/`, built once per CPU and source hash by `build`, called through
  the ctypes bindings of `cpu`), compiled for the widest instruction set the CPU has (AVX2,
  AVX-512 VNNI, AMX; `cpu.selected_isa`), where the dtype and layout are ones they take;
- **CUDA**: the Triton kernels of `kernels/cuda/` (attention over the paged cache in place,
  fused norms, the QK-norm + rotary + cache-write prologue, SwiGLU), and MoE as grouped GEMMs
  with no host sync (`cuda.applies(tensor)` decides; it never imports Triton on a CPU run);
- everywhere else, and where no kernel applies (no C compiler, `QWENKIT_NATIVE_KERNELS=0`):
  the torch code of `reference`, which the tests also hold every kernel against.

Under `torch.compile` the kernels whose work dynamo cannot trace (a ctypes call, a loop over
the experts a routing picked, a cache written in place) are torch custom ops with fake
implementations (`qwenkit::int8_linear`, `qwenkit::gguf_linear`, `qwenkit::write_kv_cache`,
`qwenkit::paged_decode_attention`, `qwenkit::fused_experts`); the elementwise ones (norms, rotary) trace their torch code, which
inductor fuses. Eager calls go to the kernels directly: calling a Python custom op adds
~170 us of dispatch per call (measured here on a 64x64 int8 matmul: 243 against 70 us), more
than a decode-time kernel itself. `describe()` names what runs (`qwenkit bench` and the
server's start-up line print it).

Why ctypes and gcc rather than `torch.utils.cpp_extension`, measured on the 2-core AVX2 machine
of docs/benchmarks.md (torch 2.13.0, gcc 12.2, machine shared and loaded): a one-function
extension (an RMSNorm, C++ against torch's headers) took ~45 s of CPU to build with
`cpp_extension.load`, and needs ninja and the Python headers, which a fresh machine may lack;
gcc builds all of csrc/ in ~4 s of CPU and needs only a C compiler. Calling through ctypes is
slower (35 us against 19 us a call for that RMSNorm, best of 7 rounds, loaded machine), which
the fused decode step makes moot: it is one ctypes call for all layers of a step. The kernels
take raw pointers and need nothing from libtorch.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwenkit.kernels import cpu, cuda, reference
from qwenkit.kernels.cpu import DEQUANTIZED_BLOCKS, GGUF_BLOCKS, PACKED_ROWS, gguf_row_bytes

__all__ = [
    "DEQUANTIZED_BLOCKS", "GGUF_BLOCKS", "INVARIANT_ROWS", "PACKED_ROWS", "DecodeLayer", "DecodeLayers", "DecodeLinear",
    "add_rms_norm", "batch_invariant", "describe", "fused_experts", "gguf_dequantize", "gguf_linear", "gguf_pack",
    "gguf_row_bytes", "has_gguf_kernel", "packed_row_step", "int4_linear", "int8_linear", "is_batch_invariant", "linear",
    "moe_syncs_with_host", "native_prefill_attention", "paged_decode_attention", "paged_prefill_attention",
    "qk_norm_rope_cache",
    "rms_norm", "rotary", "silu_and_mul", "write_kv_cache",
]

# Row limits of the quantized matmuls on CPU. The native kernels take calls of any size with
# float32 activations (they beat dequantize + GEMM at every size measured: docs/quantization.md)
# and of at most MAX_KERNEL_TOKENS rows with half-precision ones: those mean a CPU with AMX /
# AVX512-BF16 (the default dtype there), whose bfloat16 GEMM is expected to beat integer kernels
# on prefill. Without the native kernels, torch's bfloat16-activation int8 kernel takes up to
# MAX_KERNEL_TOKENS rows (it beats dequantizing only that far); larger calls dequantize a block
# of rows at a time and run a GEMM in the activations' dtype.
MAX_NATIVE_KERNEL_TOKENS = 1 << 30
MAX_KERNEL_TOKENS = 16


def _cache_holds(cache: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the KV cache stores x's dtype: the Triton kernels take one dtype; a cache asked in
    another (`kv_cache_dtype`) runs the torch code, which converts."""
    return cache.dtype == x.dtype


def _native(*tensors: torch.Tensor) -> cpu.Library | None:
    """The CPU library where every tensor is float32 on the CPU, else None."""
    if all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return cpu.library()
    return None


# -- batch invariance --------------------------------------------------------------------------
#
# A matmul library picks its blocking, vector kernel and thread split from the shape, so a row's
# numbers depend on how many rows came with it (measured with torch 2.13's CPU GEMM: a row of a
# 1-, 2-, 3-, 5-, 6-, 7- or 9-row call differs from the same row in a 300-row call; the native
# Q5_0 and K-quant kernels unpack the weights from 16 rows on, the K-quants' AVX-512 path from
# 64). Under `batch_invariant()` the native int8, Q5_0 and K-quant kernels (float32 activations)
# take one path for every row count (`cpu.Library.set_row_invariant`, `NATIVE_ROW_INVARIANT`),
# and every other CPU matmul is called on blocks of exactly INVARIANT_ROWS rows (the last one
# zero-padded): a block's shape never changes, and no GEMM mixes its rows, so each row's numbers
# are those of the row alone.
# With attention per query token (the runner's deterministic steps) and row-wise norms, a token
# is computed alike alone, in any batch, chunked or not, and with or without a prefix-cache hit.

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


def _in_row_blocks(matmul: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
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
    return _in_row_blocks(lambda rows: F.linear(rows, weight, bias), x)


# -- norms and rotary --------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, in float32, cast back before the weight (as transformers)."""
    if cuda.applies(x):
        from qwenkit.kernels.cuda import fused

        return fused.rms_norm(x, weight, eps)
    if not torch.compiler.is_compiling() and weight.is_contiguous() and (lib := _native(x, weight)) is not None:
        if x.dim() == 2 and x.stride(1) == 1:
            return lib.rms_norm(x, weight, eps)
        # Qwen3's per-head norms ([T, heads, D]): as rows of D, the numbers the fused decode step gets.
        return lib.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).view(x.shape)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual): a sub-layer's residual add fused into the next
    norm; the sum is rounded to the dtype first, as `residual + x` then the norm does."""
    if cuda.applies(x):
        from qwenkit.kernels.cuda import fused

        return fused.add_rms_norm(x, residual, weight, eps)
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: [T, 2 * I] (gate, then up) -> silu(gate) * up [T, I]."""
    if cuda.applies(x):
        from qwenkit.kernels.cuda import fused

        return fused.silu_and_mul(x)
    if not torch.compiler.is_compiling() and x.dim() == 2 and (lib := _native(x)) is not None:
        return lib.silu_and_mul(x.contiguous())
    return reference.silu_and_mul(x)


def qk_norm_rope_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    slot_mapping: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """An attention layer's prologue: split the fused projection qkv [T, (H + 2 KVH) D], apply
    Qwen3's per-head RMSNorm to q and k (weights q_norm, k_norm [D], or None), rotate both
    (cos, sin [T, 1, D]), write k and v into the cache rows slot_mapping [T]. Returns q
    [T, H, D]. One kernel on CUDA."""
    if cuda.applies(qkv) and _cache_holds(kv_cache[0], qkv):
        from qwenkit.kernels.cuda import fused

        return fused.qk_norm_rope_cache(qkv, cos, sin, kv_cache, slot_mapping, num_heads=num_heads,
                                        num_kv_heads=num_kv_heads, head_dim=head_dim, q_norm=q_norm,
                                        k_norm=k_norm, eps=eps)
    q, k, v = reference.split_qkv(qkv, num_heads, num_kv_heads, head_dim)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    q, k = rotary(q, cos, sin), rotary(k, cos, sin)
    write_kv_cache(k, v, *kv_cache, slot_mapping)
    return q


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NEOX rotary embedding of x [T, heads, D] with cos, sin [T, 1, D]."""
    if (not torch.compiler.is_compiling() and x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]
            and x.shape[2] % 2 == 0 and cos.is_contiguous() and sin.is_contiguous()
            and (lib := _native(x, cos, sin)) is not None):
        return lib.rotary(x, cos, sin)
    return reference.rotary(x, cos, sin)


# -- attention over the paged KV cache ---------------------------------------------------------


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store a step's keys and values k, v [T, KVH, D] at cache rows `slot_mapping` [T], in the
    cache's dtype (a 16-bit cache rounds them to nearest even; attention reads every key back
    from the cache, the step's own too, so a prefix-cache hit equals a miss). Under
    torch.compile an opaque op that writes in place (the graph never copies the cache)."""
    if torch.compiler.is_compiling():
        _write_kv_cache_op(k, v, k_cache, v_cache, slot_mapping)
    else:
        reference.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


@torch.library.custom_op("qwenkit::write_kv_cache", mutates_args=("k_cache", "v_cache"))
def _write_kv_cache_op(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    reference.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence against its cached context, read in place.

    q: [B, H, D]; k_cache, v_cache: [num_slots, KVH, D]; block_tables: [B, max_blocks] int32
    (entries past a sequence's blocks are ignored); context_lens: [B] int32. Position l of
    sequence b is slot block_tables[b, l // block_size] * block_size + l % block_size.
    Returns [B, H, D]; a sequence with context length 0 gets zeros. Under torch.compile an
    opaque op (a native kernel is not traced).
    """
    if cuda.applies(q) and _cache_holds(k_cache, q):
        from qwenkit.kernels.cuda import attention

        return attention.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                                block_size=block_size, scale=scale)
    if torch.compiler.is_compiling():
        return _paged_decode_attention_op(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)
    return _paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size=block_size,
                                   scale=scale)


def _paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, *, block_size, scale):
    if (k_cache.dtype in cpu.KV_DTYPES and v_cache.dtype == k_cache.dtype and k_cache.device.type == "cpu"
            and (lib := _native(q)) is not None):
        return lib.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                          block_size=block_size, scale=scale)
    return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                            block_size=block_size, scale=scale)


@torch.library.custom_op("qwenkit::paged_decode_attention", mutates_args=())
def _paged_decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    return _paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size=block_size,
                                   scale=scale)


@_paged_decode_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, block_size, scale):
    return torch.empty_like(q)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    max_query_len: int,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of packed variable-length queries against the paged cache, read in
    place: q [T, H, D], sequence b's queries at rows query_start_loc[b] .. query_start_loc[b + 1]
    - 1 and positions context_lens[b] - query_len .. context_lens[b] - 1, every key and value
    (theirs included) already in the cache. Returns [T, H, D]."""
    if cuda.applies(q) and _cache_holds(k_cache, q):
        from qwenkit.kernels.cuda import attention

        return attention.paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens,
                                                 max_query_len=max_query_len, block_size=block_size, scale=scale)
    if (q.device.type == "cpu" and native_prefill_attention(q.shape[-1], k_cache.dtype)
            and v_cache.dtype == k_cache.dtype):
        return cpu.library().paged_prefill_attention(q.float(), k_cache, v_cache, block_tables, query_start_loc,
                                                     context_lens, block_size=block_size, scale=scale).to(q.dtype)
    return reference.paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens,
                                             max_query_len=max_query_len, block_size=block_size, scale=scale)


def native_prefill_attention(head_dim: int, kv_dtype: torch.dtype) -> bool:
    """Whether CPU prefill attention runs the native kernel (csrc/attention.c) for this head dim and
    cache dtype: a SIMD variant built (its plain C build is slower than torch's SDPA: 20x at 512
    tokens on the AVX-512 EPYC), the head dim a multiple of 16."""
    lib = cpu.library()
    return lib is not None and lib.isa != "generic" and head_dim % 16 == 0 and kv_dtype in cpu.KV_DTYPES


# -- quantized matmuls -------------------------------------------------------------------------


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
    return _in_row_blocks(lambda rows: _int8_linear(rows, weight, scale), x, invariant=_native_any_rows(x))


def _int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if _native_rows(x) and (lib := cpu.library()) is not None:
        return lib.int8_linear(x, weight, scale).to(x.dtype)
    return reference.int8_linear(x, weight, scale, max_kernel_rows=MAX_KERNEL_TOKENS)


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
    return _in_row_blocks(lambda rows: _gguf_linear(rows, blocks, in_features, type_name), x,
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
    return reference.gguf_dequantize(blocks, in_features, type_name).to(dtype)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ w^T with w packed by torch's `_convert_weight_to_int4pack_for_cpu`, in x's dtype
    (torch's own CPU kernel: the packed layout is torch's)."""
    return _in_row_blocks(lambda rows: reference.int4_linear(rows, packed, scales_and_zeros), x)


# -- mixture of experts ------------------------------------------------------------------------


def fused_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """Each token through its top_k experts' SwiGLU, summed with the routing weights.

    x: [T, hidden]; expert_ids, weights: [T, top_k]; gate_up_proj: [E, 2 * I, hidden] (gate
    rows first); down_proj: [E, hidden, I]. Under torch.compile an opaque op: the loop over the
    experts in use depends on the routing. Off the CPU in bfloat16: grouped GEMMs, no host sync
    (`moe_syncs_with_host`)."""
    if _grouped_experts_apply(x):
        return reference.grouped_experts(x, expert_ids, weights, gate_up_proj, down_proj, silu_and_mul=silu_and_mul)
    if torch.compiler.is_compiling():
        return _fused_experts_op(x, expert_ids, weights, gate_up_proj, down_proj)
    if is_batch_invariant():
        return reference.fused_experts(x, expert_ids, weights, gate_up_proj, down_proj, linear=linear)
    return reference.fused_experts(x, expert_ids, weights, gate_up_proj, down_proj)


def _grouped_experts_apply(x: torch.Tensor) -> bool:
    """Where torch._grouped_mm runs: off the CPU, bfloat16, Hopper or newer on CUDA."""
    if x.device.type == "cpu" or x.dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    return x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) >= (9, 0)


def moe_syncs_with_host(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `fused_experts` reads the routing back to the host there (then no CUDA graph
    can hold an MoE step)."""
    return not _grouped_experts_apply(torch.empty(0, dtype=dtype, device=device))


@torch.library.custom_op("qwenkit::fused_experts", mutates_args=())
def _fused_experts_op(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    return reference.fused_experts(x, expert_ids, weights, gate_up_proj, down_proj)


@_fused_experts_op.register_fake
def _(x, expert_ids, weights, gate_up_proj, down_proj):
    return torch.empty_like(x)


# -- the fused CPU decode step -----------------------------------------------------------------


@dataclass(frozen=True)
class DecodeLinear:
    """One projection of a fused decode layer. kind "int8": weight int8 [N, K] and scale
    bfloat16 [N]; a GGUF type of `GGUF_BLOCKS`: weight its blocks uint8 [N, bytes per row];
    "parts": a fused matrix whose `parts` (none of them parts, none with a bias) have their own
    kinds, their outputs side by side (weight None)."""

    kind: str
    weight: torch.Tensor | None
    in_features: int
    scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # [N]
    parts: tuple[DecodeLinear, ...] = ()

    @property
    def matrices(self) -> tuple[DecodeLinear, ...]:
        """The linears holding weights: the parts, or this one."""
        return self.parts or (self,)


@dataclass(frozen=True)
class DecodeLayer:
    """The weights and KV cache of one dense decoder layer."""

    qkv: DecodeLinear
    o: DecodeLinear
    gate_up: DecodeLinear
    down: DecodeLinear
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None  # Qwen3's per-head norms
    k_norm: torch.Tensor | None
    k_cache: torch.Tensor  # [num_slots, KVH, D]
    v_cache: torch.Tensor


def _pointer(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    if not t.is_contiguous():
        raise ValueError("fused decode needs contiguous parameters")
    return t.data_ptr()


def _fits_decode_step(m: DecodeLinear) -> bool:
    """Whether csrc/decode_layers.c multiplies by `m`: a kind it has, or parts of such kinds without biases."""
    if m.kind != "parts":
        return m.kind in cpu.FD_FORMATS and not m.parts
    return bool(m.parts) and all(p.kind != "parts" and _fits_decode_step(p) and p.bias is None for p in m.parts)


class DecodeLayers:
    """Every decoder layer of a decode step as one native call (csrc/decode_layers.c): norms,
    the quantized matmuls, RoPE, the cache write, attention, SwiGLU and the residual adds.
    Built by `build`, which returns None where it does not apply."""

    def __init__(self, layers: ctypes.Array, dims: cpu.FdDims, lib: cpu.Library, tensors: list):
        self._layers = layers  # holds pointers into the weights and caches, which `tensors` keeps alive
        self._dims = dims
        self._lib = lib
        self._tensors = tensors

    @classmethod
    def build(cls, layers: list[DecodeLayer], *, hidden: int, heads: int, kv_heads: int, head_dim: int,
              intermediate: int, eps: float, scale: float) -> DecodeLayers | None:
        """The fused layers, or None where they do not apply: a projection kind without a kernel,
        tensors not on the CPU, a cache dtype the kernel does not read, native kernels off or not
        built. The arithmetic is float32 whatever the model's dtype: half-precision norms and
        biases are copied to float32 once here; a 16-bit cache is read and written as such."""
        lib = cpu.library()
        if lib is None or not layers:
            return None
        kv_dtype = layers[0].k_cache.dtype
        tensors, structs = [], []  # tensors: what the structs point into (and the parts' arrays), kept alive

        def f32(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.detach().to(torch.float32).contiguous()
            tensors.append(t)
            return t

        def fd_linear(m: DecodeLinear) -> cpu.FdLinear:
            if not m.parts:
                return cpu.FdLinear(cpu.FD_FORMATS[m.kind], m.weight.shape[0], m.in_features, 0, _pointer(m.weight),
                                    _pointer(m.scale), _pointer(f32(m.bias)))
            parts = (cpu.FdLinear * len(m.parts))(*map(fd_linear, m.parts))
            tensors.append(parts)
            return cpu.FdLinear(cpu.FD_FORMATS["parts"], sum(p.n for p in parts), m.in_features, len(parts),
                                ctypes.addressof(parts), None, _pointer(f32(m.bias)))

        for layer in layers:
            linears = (layer.qkv, layer.o, layer.gate_up, layer.down)
            matrices = [leaf for m in linears for leaf in m.matrices]
            if (not all(map(_fits_decode_step, linears))
                    or kv_dtype not in cpu.KV_DTYPES or {layer.k_cache.dtype, layer.v_cache.dtype} != {kv_dtype}
                    or any(t.device.type != "cpu" for t in (layer.k_cache, layer.v_cache, *(m.weight for m in matrices)))):
                return None
            structs.append(cpu.FdLayer(
                *map(fd_linear, linears),
                *map(_pointer, map(f32, (layer.input_norm, layer.post_norm, layer.q_norm, layer.k_norm))),
                _pointer(layer.k_cache), _pointer(layer.v_cache)))
            tensors.extend((layer.k_cache, layer.v_cache, *(m.weight for m in matrices)))
        dims = cpu.FdDims(hidden, heads, kv_heads, head_dim, intermediate, cpu.KV_DTYPES[kv_dtype], eps, scale)
        return cls((cpu.FdLayer * len(structs))(*structs), dims, lib, tensors)

    @staticmethod
    def applies(num_seqs: int) -> bool:
        """Whether the module path would also run the native kernels on `num_seqs` float32 rows
        (`MAX_NATIVE_KERNEL_TOKENS`): then the fused step computes what it would."""
        return num_seqs <= MAX_NATIVE_KERNEL_TOKENS

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, block_size: int, context_lens: torch.Tensor) -> torch.Tensor:
        """h [B, hidden] (the embeddings) through every layer; cos, sin [B, 1, D] as the model's
        rotary embedding gives them; slot_mapping [B], block_tables [B, max_blocks], context_lens
        [B] as in a decode step's metadata. Returns the residual stream after the last layer,
        float32."""
        h = h.to(torch.float32).contiguous()
        cos, sin = cos.to(torch.float32).contiguous(), sin.to(torch.float32).contiguous()
        self._lib.decode_layers(self._layers, self._dims, h, cos, sin,
                                slot_mapping.to(torch.int64).contiguous(),
                                block_tables.to(torch.int32).contiguous(), block_size,
                                context_lens.to(torch.int32).contiguous())
        return h


# -- what runs ---------------------------------------------------------------------------------


def describe(device: torch.device | str = "cpu") -> dict[str, str]:
    """Which implementation each kernel runs on `device` (on CPU: float32 activations)."""
    device = torch.device(device)
    if device.type != "cpu":
        if not cuda.enabled(device):
            return {"kernels": "torch"}
        grouped = not moe_syncs_with_host(torch.bfloat16, device)
        return {
            "attention": "Triton: paged decode and varlen prefill, the cache read in place",
            "qk_norm, rotary, cache write": "Triton (one kernel a layer)",
            "rms_norm (+ residual add), silu_and_mul": "Triton",
            "fused_experts": "grouped GEMM (torch._grouped_mm), no host sync" if grouped
            else "torch (loop over the experts in use)",
            "matmuls": "cuBLAS",
        }
    lib = cpu.library()
    if lib is None:
        return {
            "cpu_isa": "none (torch code)",
            "int8_linear": f"torch (_weight_int8pack_mm up to {MAX_KERNEL_TOKENS} rows, then dequantize + GEMM)",
            "gguf_linear": "torch (dequantize + GEMM)",
            "decode_attention": "torch (gather + SDPA)",
            "prefill_attention": "torch (gather + SDPA)",
            "rms_norm, rotary": "torch",
            "decode_layers": "off (torch modules)",
            "int4_linear": "torch (_weight_int4pack_mm_for_cpu)",
            "fused_experts": "torch (grouped by expert)",
        }
    native = f"C {lib.isa}"
    return {
        "cpu_isa": lib.isa,
        "int8_linear": f"{native}: {cpu.DOT_PRODUCTS[lib.isa]}",
        "gguf_linear": f"{native}: {', '.join(GGUF_BLOCKS)} in their blocks (Q5_0 8 rows interleaved)",
        "decode_attention": f"{native} (paged, in place)",
        "prefill_attention": f"{native} (paged, in place, online softmax)" if lib.isa != "generic"
        else "torch (gather + SDPA)",
        "rms_norm, rotary": native,
        "decode_layers": f"{native} (one call per decode step)",
        "int4_linear": "torch (_weight_int4pack_mm_for_cpu)",
        "fused_experts": "torch (grouped by expert)",
    }


def summary(device: torch.device | str = "cpu") -> str:
    """One line for start-up messages: the kernels `device` runs."""
    if torch.device(device).type != "cpu":
        if not cuda.enabled(torch.device(device)):
            return f"{torch.device(device).type} kernels: torch"
        return f"{torch.device(device).type} kernels: Triton (paged attention, fused norms and prologue), cuBLAS"
    lib = cpu.library()
    if lib is None:
        return "CPU kernels: torch code (native kernels off or not built)"
    return f"CPU kernels: C {lib.isa} (int8 dot products: {cpu.DOT_PRODUCTS[lib.isa]})"
