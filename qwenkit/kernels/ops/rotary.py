"""Rotary embeddings, and the attention layer's prologue (QK-norm, rotary, the cache write)."""

from __future__ import annotations

import torch

from qwenkit.kernels import cpu, cuda, reference
from qwenkit.kernels.ops import Op, cache_holds, native, native_16bit
from qwenkit.kernels.ops.attention import write_kv_cache
from qwenkit.kernels.ops.norm import rms_norm


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NEOX rotary embedding of x [T, heads, D] with cos, sin [T, 1, D]."""
    if (not torch.compiler.is_compiling() and x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]
            and x.shape[2] % 2 == 0 and cos.is_contiguous() and sin.is_contiguous()
            and (lib := native(x, cos, sin)) is not None):
        return lib.rotary(x, cos, sin)
    return reference.rotary(x, cos, sin)


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
    [T, H, D]. One kernel on CUDA; elsewhere the ops one at a time (each its own pick)."""
    if cuda.applies(qkv) and cache_holds(kv_cache[0], qkv):
        from qwenkit.kernels.cuda import fused

        return fused.qk_norm_rope_cache(qkv, cos, sin, kv_cache, slot_mapping, num_heads=num_heads,
                                        num_kv_heads=num_kv_heads, head_dim=head_dim, q_norm=q_norm,
                                        k_norm=k_norm, eps=eps)
    if _native_prologue(qkv, cos, sin, kv_cache, head_dim, q_norm, k_norm):
        return native_16bit(qkv).qk_norm_rope_cache(
            qkv, cos, sin, kv_cache, slot_mapping, num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, q_norm=q_norm, k_norm=k_norm, eps=eps)
    q, k, v = reference.split_qkv(qkv, num_heads, num_kv_heads, head_dim)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    q, k = rotary(q, cos, sin), rotary(k, cos, sin)
    write_kv_cache(k, v, *kv_cache, slot_mapping)
    return q


def _native_prologue(qkv, cos, sin, kv_cache, head_dim, q_norm, k_norm) -> bool:
    """Whether the C prologue applies: a 16-bit qkv on the CPU (float32 runs the norm and rotary
    kernels one at a time, the numbers the fused decode step has), tensors in its layout, not
    under torch.compile (the cache write must stay an opaque op there)."""
    k_cache, v_cache = kv_cache
    norms = [n for n in (q_norm, k_norm) if n is not None]
    return (not torch.compiler.is_compiling() and qkv.dim() == 2 and qkv.stride(1) == 1 and head_dim % 2 == 0
            and head_dim <= cpu.MAX_HEAD_DIM and cos.is_contiguous() and sin.is_contiguous()
            and all(n.is_contiguous() for n in norms) and k_cache.device.type == "cpu"
            and k_cache.dtype in cpu.KV_DTYPES and v_cache.dtype == k_cache.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous()
            and native_16bit(qkv, cos, sin, *norms) is not None)


OPS = {
    "rotary": Op(rotary, cpu=cpu.Library.rotary, reference=reference.rotary),
    "qk_norm_rope_cache": Op(qk_norm_rope_cache, cpu=cpu.Library.qk_norm_rope_cache,
                             triton="fused:qk_norm_rope_cache", reference=reference.qk_norm_rope_cache),
}
