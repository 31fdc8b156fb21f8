"""ctypes bindings of the CPU kernels (csrc/), and the instruction-set variant that runs.

The variant is chosen once per process: the widest of `build.ISA_FLAGS` whose instructions the
CPU has (`REQUIRED_FLAGS`, read from /proc/cpuinfo), or the one `QWENKIT_CPU_ISA` names (to
compare variants; a variant the CPU cannot run is refused). AMX also needs the kernel's
permission to use the tile registers (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), asked once at load;
where it is refused the AVX-512 variant runs instead. `QWENKIT_NATIVE_KERNELS=0` turns every
native kernel off, as does a missing C compiler (with a warning): `library()` is then None and
`qwenkit.kernels` runs the torch code of `reference`.

`Library` wraps one built variant: each C function's signature is declared once, and its
methods take and return tensors (inputs already checked by `qwenkit.kernels`, which decides
where a kernel applies). ctypes releases the GIL during each call.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

from qwenkit.kernels import build

logger = logging.getLogger(__name__)

# /proc/cpuinfo flags each variant's instructions need.
_AVX512 = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
REQUIRED_FLAGS = {
    "amx": _AVX512 | {"amx_tile", "amx_int8"},
    "avx512_vnni": _AVX512,
    "avx2": {"avx2", "fma", "f16c"},
    "generic": set(),
}
# What each variant's integer dot product is (for `describe`).
DOT_PRODUCTS = {
    "amx": "AMX tiles (tdpbssd) for 16+ rows, else vpdpbusd",
    "avx512_vnni": "vpdpbusd",
    "avx2": "vpmaddubsw + vpmaddwd",
    "generic": "plain C",
}
# GGUF block types the C kernels multiply (the K-quants as stored, Q5_0 8 rows interleaved at load
# by `gguf_pack`, the same size): (values, bytes) of one block.
GGUF_BLOCKS = {"Q5_0": (32, 22), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
# GGUF types the experts of a sparse layer are multiplied in as stored (csrc/moe.c): the K-quants,
# whose layout is the file's, so the experts can be mapped from it.
MOE_BLOCKS = ("Q4_K", "Q5_K", "Q6_K")
# Rows the kernels' layout of a type packs together (`gguf_pack`: Q5_0 interleaves 8): a matrix's
# rows, and the row ranges packed, are multiples of it.
PACKED_ROWS = {"Q5_0": 8, "Q4_K": 1, "Q5_K": 1, "Q6_K": 1}
# The types the C kernels dequantize (`gguf_dequantize`): those, and Q8_0 (loading only: its
# matrices become int8), as stored.
DEQUANTIZED_BLOCKS = {**GGUF_BLOCKS, "Q8_0": (32, 34)}


def native_kernels_enabled() -> bool:
    return os.environ.get("QWENKIT_NATIVE_KERNELS", "1") != "0"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not there)."""
    line = build._cpu_flags()
    return frozenset(line.partition(":")[2].split())


def supported_isas() -> list[str]:
    """The variants this CPU runs, widest first."""
    flags = cpu_flags()
    x86 = build.platform.machine().lower() in ("x86_64", "amd64")
    return [isa for isa, needs in REQUIRED_FLAGS.items() if needs <= flags and (x86 or isa == "generic")]


def _fields(*names: str, kind=ctypes.c_void_p) -> list[tuple[str, type]]:
    return [(name, kind) for name in names]


# Mirrors of csrc/decode_layers.h (tests/test_kernels.py compiles the header and compares offsets).
class FdLinear(ctypes.Structure):
    _fields_ = _fields("format", "n", "k", "num_parts", kind=ctypes.c_int32) + _fields("weight", "scale", "bias")


class FdLayer(ctypes.Structure):
    _fields_ = [(name, FdLinear) for name in ("qkv", "o", "gate_up", "down")] + _fields(
        "input_norm", "post_norm", "q_norm", "k_norm", "k_cache", "v_cache")


class FdDims(ctypes.Structure):
    _fields_ = _fields("hidden", "heads", "kv_heads", "head_dim", "intermediate", "kv_dtype",
                       kind=ctypes.c_int32) + _fields("eps", "scale", kind=ctypes.c_float)


FD_FORMATS = {"int8": 0, "Q5_0": 1, "Q4_K": 2, "Q5_K": 3, "Q6_K": 4, "parts": 5}  # csrc/decode_layers.h's FORMAT_*
KV_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/kernels.h's KV_*
# The 16-bit dtypes the norm, SwiGLU and attention-prologue kernels also take (csrc/norm_rope.c's
# *_16bit: computed in float32, rounded where torch's ops round); codes as KV_DTYPES.
HALF_DTYPES = (torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 1024  # csrc/norm_rope.c's QK_MAX_HEAD_DIM

_P, _I, _I64, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {  # name: (restype, argtypes)
    "rms_norm_f32": (None, [_P, _I64, _P, _P, _I, _I, _F]),
    "silu_and_mul_f32": (None, [_P, _P, _I, _I]),
    "rms_norm_16bit": (None, [_P, _I64, _P, _P, _I, _I, _F, _I]),
    "add_rms_norm_16bit": (None, [_P] * 5 + [_I, _I, _F, _I]),
    "silu_and_mul_16bit": (None, [_P, _P, _I, _I, _I]),
    "qk_norm_rope_cache_16bit": (_I, [_P, _I64] + [_P] * 4 + [_F] + [_P] * 3 + [_I, _P, _I64] + [_I] * 5),
    "qk_set_row_invariant": (None, [_I]),
    "rope_neox_f32": (None, [_P, _I64, _P, _P, _P, _I, _I, _I]),
    "paged_decode_attention_f32": (None, [_P] * 6 + [_I] * 6 + [_F, _I]),
    "paged_prefill_attention_f32": (_I, [_P] * 7 + [_I] * 6 + [_F, _I]),
    "int8_linear_q8": (_I, [_P] * 4 + [_I] * 3),
    **{f"{t.lower()}_linear_q8": (_I, [_P] * 3 + [_I] * 3) for t in GGUF_BLOCKS},
    **{f"{t.lower()}_dequantize": (_I, [_P] * 2 + [_I] * 3) for t in DEQUANTIZED_BLOCKS},
    "q5_0_pack": (None, [_P] * 2 + [_I] * 2),
    "gguf_experts_q8": (_I, [_P, _I, _I, _P, _P] + [_I] * 3 + [_P, _I] * 3 + [_P]),
    "decode_layers": (_I, [_P, _I, _P, _P, _I] + [_P] * 4 + [_I] * 2 + [_P]),
    "qk_amx_init": (_I, []),
    "kv_store_rows": (None, [_P, _P, _I, _I]),
}


class Library:
    """One built variant of the kernels."""

    def __init__(self, path: Path, isa: str):
        self.isa = isa
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(self._lib, name)
            fn.restype, fn.argtypes = restype, argtypes

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [T, H] (rows may be strided, elements contiguous), float32 or a 16-bit dtype, weight [H]
        of x's dtype -> normalised [T, H] (16-bit: cast before the weight multiplies, as transformers)."""
        y = torch.empty(x.shape, dtype=x.dtype)
        if x.dtype == torch.float32:
            self._lib.rms_norm_f32(x.data_ptr(), x.stride(0), weight.data_ptr(), y.data_ptr(), x.shape[0],
                                   x.shape[1], eps)
        else:
            self._lib.rms_norm_16bit(x.data_ptr(), x.stride(0), weight.data_ptr(), y.data_ptr(), x.shape[0],
                                     x.shape[1], eps, _half_code(x, weight))
        return y

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual), x and residual contiguous [T, H]: one pass for a
        16-bit dtype (the sum rounded first, as torch's add), torch's add then `rms_norm` in float32."""
        if x.dtype == torch.float32:
            summed = x + residual
            return self.rms_norm(summed, weight, eps), summed
        code = _half_code(x, residual, weight)
        if not (x.is_contiguous() and residual.is_contiguous()) or x.shape != residual.shape or x.dim() != 2:
            raise ValueError(f"add_rms_norm takes contiguous x and residual of one shape [T, H], got "
                             f"{list(x.shape)} and {list(residual.shape)}")
        y, summed = torch.empty_like(x), torch.empty_like(x)
        self._lib.add_rms_norm_16bit(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), y.data_ptr(),
                                     summed.data_ptr(), x.shape[0], x.shape[1], eps, code)
        return y, summed

    def set_row_invariant(self, on: bool) -> None:
        """While on, the int8 and Q5_0 matmuls compute each row alike whatever the row count."""
        self._lib.qk_set_row_invariant(int(on))

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, 2 * I] contiguous (gate, then up), float32 or a 16-bit dtype -> silu(gate) * up [T, I]
        (16-bit: silu(gate) rounded before the product, as torch's two ops)."""
        t, width = x.shape
        out = torch.empty(t, width // 2, dtype=x.dtype)
        if x.dtype == torch.float32:
            self._lib.silu_and_mul_f32(x.data_ptr(), out.data_ptr(), t, width // 2)
        else:
            self._lib.silu_and_mul_16bit(x.data_ptr(), out.data_ptr(), t, width // 2, _half_code(x))
        return out

    def qk_norm_rope_cache(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           kv_cache: tuple[torch.Tensor, torch.Tensor], slot_mapping: torch.Tensor, *,
                           num_heads: int, num_kv_heads: int, head_dim: int, q_norm: torch.Tensor | None,
                           k_norm: torch.Tensor | None, eps: float) -> torch.Tensor:
        """`qwenkit.kernels.qk_norm_rope_cache` in one pass, for a 16-bit qkv [T, (H + 2 KVH) D]
        (elements contiguous), cos / sin [T, 1, D] and norms [D] of its dtype; a contiguous cache
        of a dtype in KV_DTYPES; int64 slots. Returns q [T, H, D]."""
        norms = [n for n in (q_norm, k_norm) if n is not None]
        code = _half_code(qkv, cos, sin, *norms)
        k_cache, v_cache = kv_cache
        t, width = qkv.shape
        if width != (num_heads + 2 * num_kv_heads) * head_dim or qkv.stride(1) != 1:
            raise ValueError(f"qkv must be [T, {(num_heads + 2 * num_kv_heads) * head_dim}] with contiguous rows, "
                             f"got {list(qkv.shape)} strides {qkv.stride()}")
        if head_dim % 2 or head_dim > MAX_HEAD_DIM:
            raise ValueError(f"the native attention prologue takes an even head dim up to {MAX_HEAD_DIM}, "
                             f"not {head_dim}")
        if (cos.shape != (t, 1, head_dim) or sin.shape != cos.shape or not (cos.is_contiguous() and sin.is_contiguous())
                or any(n.shape != (head_dim,) or not n.is_contiguous() for n in norms)):
            raise ValueError(f"cos / sin must be contiguous [{t}, 1, {head_dim}] and the norms [{head_dim}]")
        if (k_cache.dtype not in KV_DTYPES or v_cache.dtype != k_cache.dtype or k_cache.shape != v_cache.shape
                or k_cache.shape[1:] != (num_kv_heads, head_dim)
                or not (k_cache.is_contiguous() and v_cache.is_contiguous())):
            raise ValueError(f"the KV cache must be two contiguous [slots, {num_kv_heads}, {head_dim}] tensors "
                             f"of one dtype of {list(KV_DTYPES)}")
        slots = slot_mapping.to(torch.int64).contiguous()
        if slots.shape != (t,):
            raise ValueError(f"slot_mapping must be [{t}], got {list(slot_mapping.shape)}")
        q = torch.empty(t, num_heads, head_dim, dtype=qkv.dtype)
        none = ctypes.c_void_p(None)
        status = self._lib.qk_norm_rope_cache_16bit(
            qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(),
            none if q_norm is None else q_norm.data_ptr(), none if k_norm is None else k_norm.data_ptr(), eps,
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), KV_DTYPES[k_cache.dtype], slots.data_ptr(),
            k_cache.shape[0], t, num_heads, num_kv_heads, head_dim, code)
        if status == -1:
            raise IndexError(f"slot_mapping holds a slot outside the cache's {k_cache.shape[0]} rows")
        return q

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x float32 [T, heads, D] (heads contiguous within a token), cos / sin [T, 1, D] contiguous."""
        out = torch.empty(x.shape, dtype=torch.float32)
        t, heads, d = x.shape
        self._lib.rope_neox_f32(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), t, heads, d)
        return out

    def paged_decode_attention(self, q, k_cache, v_cache, block_tables, context_lens, *, block_size: int,
                               scale: float) -> torch.Tensor:
        """Shapes as `qwenkit.kernels.paged_decode_attention`; float32 q, a cache of a dtype in
        KV_DTYPES, int32 tables."""
        q = q.contiguous()
        block_tables, context_lens = block_tables.contiguous(), context_lens.contiguous()
        if q.dtype != torch.float32 or block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
            raise TypeError("the native kernel takes float32 q and int32 block tables and context lengths")
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("the KV cache must be contiguous")
        num_seqs, num_heads, head_dim = q.shape
        out = torch.empty_like(q)
        self._lib.paged_decode_attention_f32(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(),
            out.data_ptr(), num_seqs, num_heads, k_cache.shape[1], head_dim, block_size, block_tables.shape[1], scale,
            KV_DTYPES[k_cache.dtype])
        return out

    def paged_prefill_attention(self, q, k_cache, v_cache, block_tables, query_start_loc, context_lens, *,
                                max_query_len: int, block_size: int, scale: float) -> torch.Tensor:
        """Shapes as `qwenkit.kernels.paged_prefill_attention`; float32 q, a cache of a dtype in
        KV_DTYPES, int32 tables; the head dim a multiple of 16 (max_query_len: not needed here,
        the kernel splits each sequence's queries itself)."""
        q = q.contiguous()
        tables = [t.contiguous() for t in (block_tables, query_start_loc, context_lens)]
        if q.dtype != torch.float32 or any(t.dtype != torch.int32 for t in tables):
            raise TypeError("the native kernel takes float32 q and int32 block tables, query starts and lengths")
        block_tables, query_start_loc, context_lens = tables
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("the KV cache must be contiguous")
        num_tokens, num_heads, head_dim = q.shape
        if head_dim % 16:
            raise ValueError(f"the native prefill attention takes a head dim that is a multiple of 16, not {head_dim}")
        out = torch.empty_like(q)
        if self._lib.paged_prefill_attention_f32(
                q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
                query_start_loc.data_ptr(), context_lens.data_ptr(), out.data_ptr(), context_lens.shape[0], num_heads,
                k_cache.shape[1], head_dim, block_size, block_tables.shape[1], scale, KV_DTYPES[k_cache.dtype]):
            raise MemoryError("paged prefill attention: no memory for its buffers")
        return out

    def to_kv_dtype(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """float32 x converted as the fused decode step writes a `dtype` cache (tests)."""
        x = x.to(torch.float32).contiguous()
        out = torch.empty(x.shape, dtype=dtype)
        self._lib.kv_store_rows(x.data_ptr(), out.data_ptr(), x.numel(), KV_DTYPES[dtype])
        return out

    def int8_linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x [M, K] @ (weight int8 [N, K] * scale bfloat16 [N])^T, float32 [M, N]."""
        if weight.dtype != torch.int8 or scale.dtype != torch.bfloat16:
            raise TypeError("int8_linear takes int8 weights [N, K] and bfloat16 scales [N]")
        (n, k), x = weight.shape, _activations(x, weight.shape[1], "int8_linear")
        weight, scale = weight.contiguous(), scale.contiguous()
        y = torch.empty(x.shape[0], n, dtype=torch.float32)
        if self._lib.int8_linear_q8(x.data_ptr(), weight.data_ptr(), scale.data_ptr(), y.data_ptr(), x.shape[0], n, k):
            raise MemoryError(f"int8_linear: no memory for the quantized activations ({x.shape[0]} x {k})")
        return y

    def gguf_linear(self, x: torch.Tensor, blocks: torch.Tensor, in_features: int, type_name: str) -> torch.Tensor:
        """x [M, K] @ w^T, w as GGUF rows of `type_name` in the kernels' layout (`gguf_pack`; uint8
        [N, bytes per row]); float32 [M, N]."""
        blocks, x = _blocks(blocks, in_features, type_name), _activations(x, in_features, "gguf_linear")
        y = torch.empty(x.shape[0], blocks.shape[0], dtype=torch.float32)
        fn = getattr(self._lib, f"{type_name.lower()}_linear_q8")
        if fn(x.data_ptr(), blocks.data_ptr(), y.data_ptr(), x.shape[0], blocks.shape[0], in_features):
            raise MemoryError(f"gguf_linear: no memory for the quantized activations ({x.shape[0]} x {in_features})")
        return y

    def gguf_experts(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                     gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, types: str) -> torch.Tensor:
        """A sparse layer's experts in GGUF K-quant blocks (csrc/moe.c): x [T, hidden], expert_ids int64 and
        weights [T, top_k]; gate, up uint8 [E, I, bytes per row of hidden], down [E, hidden, bytes per
        row of I], in blocks of `types` ("gate,up,down" GGUF types); float32 [T, hidden]."""
        types = tuple(types.split(","))
        num_experts, intermediate = gate.shape[:2]
        hidden = x.shape[1]
        for blocks, type_name, rows, k in zip((gate, up, down), types, (intermediate, intermediate, hidden),
                                              (hidden, hidden, intermediate)):
            if type_name not in MOE_BLOCKS:
                raise ValueError(f"no native expert kernel for GGUF {type_name} (have {', '.join(MOE_BLOCKS)})")
            row = gguf_row_bytes(type_name, k)
            shape = (num_experts, rows, row)
            if blocks.dtype != torch.uint8 or tuple(blocks.shape) != shape or not blocks.is_contiguous():
                raise TypeError(f"expected contiguous uint8 {type_name} experts [{num_experts}, {rows}, {row}], "
                                f"got {blocks.dtype} {list(blocks.shape)}")
        x = _activations(x, hidden, "gguf_experts")
        expert_ids = expert_ids.to(torch.int64).contiguous()
        weights = weights.to(torch.float32).contiguous()
        out = torch.empty(x.shape[0], hidden, dtype=torch.float32)
        rc = self._lib.gguf_experts_q8(x.data_ptr(), x.shape[0], hidden, expert_ids.data_ptr(), weights.data_ptr(),
                                       expert_ids.shape[1], num_experts, intermediate,
                                       gate.data_ptr(), FD_FORMATS[types[0]], up.data_ptr(), FD_FORMATS[types[1]],
                                       down.data_ptr(), FD_FORMATS[types[2]], out.data_ptr())
        if rc == -2:
            raise ValueError(f"gguf_experts: an expert id outside 0..{num_experts - 1}")
        if rc:
            raise MemoryError(f"gguf_experts: no memory for the step's buffers ({x.shape[0]} tokens)")
        return out

    def gguf_pack(self, blocks: torch.Tensor, in_features: int, type_name: str) -> torch.Tensor:
        """A file's GGUF rows of `type_name` -> the layout the kernels below take (Q5_0 8 rows
        interleaved, csrc/quant.c; the K-quants as stored)."""
        blocks = _blocks(blocks, in_features, type_name)
        if type_name != "Q5_0":
            return blocks
        if blocks.shape[0] % PACKED_ROWS["Q5_0"]:
            raise ValueError(f"Q5_0 rows are packed {PACKED_ROWS['Q5_0']} at a time: got {blocks.shape[0]} rows")
        out = torch.empty_like(blocks)
        self._lib.q5_0_pack(blocks.data_ptr(), out.data_ptr(), blocks.shape[0], in_features)
        return out

    def gguf_dequantize(self, blocks: torch.Tensor, in_features: int, type_name: str,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """GGUF rows of `type_name` in the kernels' layout (uint8 [N, bytes per row]) -> [N, in_features]
        of `dtype` (float32, or a 16-bit float rounded as torch's .to() rounds)."""
        blocks = _blocks(blocks, in_features, type_name, DEQUANTIZED_BLOCKS)
        if dtype not in KV_DTYPES:
            raise TypeError(f"gguf_dequantize gives float32, float16 or bfloat16, not {dtype}")
        out = torch.empty(blocks.shape[0], in_features, dtype=dtype)
        if getattr(self._lib, f"{type_name.lower()}_dequantize")(blocks.data_ptr(), out.data_ptr(), blocks.shape[0],
                                                                   in_features, KV_DTYPES[dtype]):
            raise MemoryError(f"gguf_dequantize: no memory for the row buffers ({in_features} values a row)")
        return out

    def decode_layers(self, layers: ctypes.Array, dims: FdDims, h: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor, block_size: int,
                      context_lens: torch.Tensor) -> None:
        """Every layer of a decode step on h (float32 [M, hidden], updated in place); see csrc/decode_layers.c."""
        if self._lib.decode_layers(ctypes.addressof(layers), len(layers), ctypes.addressof(dims), h.data_ptr(),
                                   h.shape[0], cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
                                   block_tables.data_ptr(), block_tables.shape[1], block_size,
                                   context_lens.data_ptr()):
            raise MemoryError(f"fused decode: no memory for the step's buffers ({h.shape[0]} sequences)")


def _half_code(*tensors: torch.Tensor) -> int:
    """The C kernels' code of the one 16-bit dtype every tensor has (TypeError otherwise)."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or tensors[0].dtype not in HALF_DTYPES:
        raise TypeError(f"the 16-bit kernels take tensors of one of {list(HALF_DTYPES)}, "
                        f"got {sorted(map(str, dtypes))}")
    return KV_DTYPES[tensors[0].dtype]


def gguf_row_bytes(type_name: str, in_features: int, types: dict = GGUF_BLOCKS) -> int:
    """Bytes of one row of `in_features` values in GGUF blocks of `type_name` (ValueError where
    the row is not whole blocks, or the type has no kernel here: `types`)."""
    if type_name not in types:
        raise ValueError(f"no native kernel for GGUF {type_name} (have {', '.join(types)})")
    values, size = types[type_name]
    if in_features % values:
        raise ValueError(f"{type_name} rows need a multiple of {values} values, got {in_features}")
    return in_features // values * size


def _activations(x: torch.Tensor, k: int, what: str) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"{what}: x must be [M, {k}], got {list(x.shape)}")
    return x.to(torch.float32).contiguous()


def _blocks(blocks: torch.Tensor, in_features: int, type_name: str, types: dict = GGUF_BLOCKS) -> torch.Tensor:
    row = gguf_row_bytes(type_name, in_features, types)
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != row:
        raise TypeError(f"expected uint8 {type_name} blocks [N, {row}], got {blocks.dtype} {list(blocks.shape)}")
    return blocks.contiguous()


def load(isa: str, folder: Path | None = None, *, extra_flags: tuple[str, ...] = (), emulated: bool = False,
         csrc: Path = build.CSRC, progress: bool = False) -> Library:
    """Build (once) and load the `isa` variant (`emulated`: its build for an AVX2 CPU, tests
    only; `csrc`: another version of the sources, benchmarks; `progress`: a line on stderr while
    it compiles); raises build.BuildError or OSError, or TileStateRefused."""
    path = build.build(isa, folder, extra_flags=extra_flags, emulated=emulated, csrc=csrc, progress=progress)
    lib = Library(path, isa)
    if lib._lib.qk_amx_init():
        raise TileStateRefused("Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)")
    return lib


class TileStateRefused(RuntimeError):
    """The kernel would not let this process use AMX tiles (Linux before 5.16, or a policy)."""


def selected_isa() -> str:
    """The variant this process runs: `QWENKIT_CPU_ISA`, else the widest the CPU has."""
    supported = supported_isas()
    wanted = os.environ.get("QWENKIT_CPU_ISA")
    if wanted:
        if wanted not in REQUIRED_FLAGS:
            raise ValueError(f"QWENKIT_CPU_ISA={wanted!r}: choose one of {', '.join(REQUIRED_FLAGS)}")
        if wanted not in supported:
            raise ValueError(f"QWENKIT_CPU_ISA={wanted!r}: this CPU runs only {', '.join(supported)}")
        return wanted
    return supported[0]


@functools.cache
def library() -> Library | None:
    """The selected variant's library, or None when native kernels are off or cannot be built
    (then `qwenkit.kernels` runs torch code)."""
    if not native_kernels_enabled():
        return None
    isa = selected_isa()
    try:
        try:
            return load(isa, progress=True)
        except TileStateRefused as e:
            logger.warning("%s: running the avx512_vnni kernels", e)
            return load("avx512_vnni", progress=True)
    except (OSError, build.BuildError) as e:
        logger.warning("native CPU kernels unavailable, running torch code instead: %s", e)
        return None
