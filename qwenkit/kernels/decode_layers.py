"""The fused CPU decode step: every decoder layer of a decode step as one native call
(csrc/decode_layers.c), built from the model's weights and KV cache by `DecodeLayers.build`."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from qwenkit.kernels import cpu
from qwenkit.kernels.ops import linear as linear_ops


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
        return num_seqs <= linear_ops.MAX_NATIVE_KERNEL_TOKENS

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
