"""Fused element-wise kernels of a decoder layer, one launch where torch takes several.

Each rounds where transformers' eager code rounds (a half-precision result is rounded to
the model's dtype after every torch op that produces one), so bfloat16 outputs stay as
close to the reference as the torch path's, and float32 ones agree to a few ulps.

- `rms_norm`, `add_rms_norm` (the residual add of the previous sub-layer fused in front);
- `silu_and_mul`: SwiGLU's `silu(gate) * up` on the fused gate_up matmul's output;
- `qk_norm_rope_cache`: the attention prologue — split the fused qkv row, Qwen3's per-head
  RMSNorm of q and k, NEOX rotary on both, and the write of k and v into their cache
  slots — one program per token instead of ~30 torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps, stride_x, stride_r,
    N: tl.constexpr, N_PAD: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    t = tl.program_id(0)
    i = tl.arange(0, N_PAD)
    ok = i < N
    x = tl.load(x_ptr + t * stride_x + i, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(res_ptr + t * stride_r + i, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + t * N + i, x, mask=ok)
    # transformers' RMSNorm: normalise in float32, round to the dtype, then scale.
    xf = x.to(tl.float32)
    y = (xf / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)).to(x.dtype)
    w = tl.load(w_ptr + i, mask=ok, other=0.0)
    tl.store(out_ptr + t * N + i, (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x (any leading shape)."""
    rows = _rows(x)
    n = rows.shape[1]
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, rows, weight, out, out, eps, rows.stride(0), rows.stride(0),
        N=n, N_PAD=triton.next_power_of_2(n), HAS_RESIDUAL=False,
    )
    return out.view(x.shape)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual) for x, residual: [T, N]; the sum is rounded to
    the dtype before the norm, as `residual + x` followed by the norm does."""
    x, residual = _rows(x), _rows(residual)
    num_tokens, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x)
    _rms_norm_kernel[(num_tokens,)](
        x, residual, weight, out, res_out, eps, x.stride(0), residual.stride(0),
        N=n, N_PAD=triton.next_power_of_2(n), HAS_RESIDUAL=True,
    )
    return out, res_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, N: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    gate = tl.load(x_ptr + t * stride_x + i, mask=ok, other=0.0)
    up = tl.load(x_ptr + t * stride_x + N + i, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + t * N + i, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=ok)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] (gate, then up) -> silu(gate) * up: [T, I]."""
    x = _rows(x)
    num_tokens, n = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, n, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(n, block))](x, out, x.stride(0), N=n, BLOCK=block)
    return out


@triton.jit
def _rotate_heads(x1, x2, cos1, cos2, sin1, sin2, DTYPE: tl.constexpr):
    """NEOX rotary on [heads, D/2] halves, each product and sum rounded to DTYPE as
    `x * cos + rotate_half(x) * sin` rounds in torch."""
    a1 = (x1 * cos1).to(DTYPE).to(tl.float32)
    b1 = (-x2 * sin1).to(DTYPE).to(tl.float32)
    a2 = (x2 * cos2).to(DTYPE).to(tl.float32)
    b2 = (x1 * sin2).to(DTYPE).to(tl.float32)
    return (a1 + b1).to(DTYPE), (a2 + b2).to(DTYPE)


@triton.jit
def _head_norm(x1, x2, w1, w2, eps, DTYPE: tl.constexpr, D: tl.constexpr):
    """Per-head RMSNorm over both halves ([heads, D/2] each), rounded as transformers does."""
    inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1, keep_dims=True) + tl.sum(x2 * x2, axis=1, keep_dims=True)) / D + eps)
    y1 = (x1 * inv).to(DTYPE).to(tl.float32)
    y2 = (x2 * inv).to(DTYPE).to(tl.float32)
    return (w1[None, :] * y1).to(DTYPE).to(tl.float32), (w2[None, :] * y2).to(DTYPE).to(tl.float32)


@triton.jit
def _qk_norm_rope_cache_kernel(
    qkv_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, q_out_ptr,
    eps, stride_qkv, stride_cos, stride_cs, stride_ch,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, H_PAD: tl.constexpr, KVH_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, QK_NORM: tl.constexpr,
):
    t = tl.program_id(0)
    row = qkv_ptr + t * stride_qkv
    j = tl.arange(0, HALF_PAD)
    j_ok = j < HALF
    dtype = q_out_ptr.dtype.element_ty
    cos1 = tl.load(cos_ptr + t * stride_cos + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + t * stride_cos + HALF + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + t * stride_cos + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + t * stride_cos + HALF + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    if QK_NORM:
        qw1 = tl.load(q_norm_ptr + j, mask=j_ok, other=0.0).to(tl.float32)
        qw2 = tl.load(q_norm_ptr + HALF + j, mask=j_ok, other=0.0).to(tl.float32)
        kw1 = tl.load(k_norm_ptr + j, mask=j_ok, other=0.0).to(tl.float32)
        kw2 = tl.load(k_norm_ptr + HALF + j, mask=j_ok, other=0.0).to(tl.float32)

    h = tl.arange(0, H_PAD)
    q_ok = (h < NUM_HEADS)[:, None] & j_ok[None, :]
    offsets = h[:, None] * HEAD_DIM + j[None, :]
    q1 = tl.load(row + offsets, mask=q_ok, other=0.0).to(tl.float32)
    q2 = tl.load(row + offsets + HALF, mask=q_ok, other=0.0).to(tl.float32)
    if QK_NORM:
        q1, q2 = _head_norm(q1, q2, qw1, qw2, eps, dtype, HEAD_DIM)
    q1, q2 = _rotate_heads(q1, q2, cos1, cos2, sin1, sin2, dtype)
    tl.store(q_out_ptr + t * NUM_HEADS * HEAD_DIM + offsets, q1, mask=q_ok)
    tl.store(q_out_ptr + t * NUM_HEADS * HEAD_DIM + offsets + HALF, q2, mask=q_ok)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    kh = tl.arange(0, KVH_PAD)
    k_ok = (kh < NUM_KV_HEADS)[:, None] & j_ok[None, :]
    k_offsets = NUM_HEADS * HEAD_DIM + kh[:, None] * HEAD_DIM + j[None, :]
    k1 = tl.load(row + k_offsets, mask=k_ok, other=0.0).to(tl.float32)
    k2 = tl.load(row + k_offsets + HALF, mask=k_ok, other=0.0).to(tl.float32)
    if QK_NORM:
        k1, k2 = _head_norm(k1, k2, kw1, kw2, eps, dtype, HEAD_DIM)
    k1, k2 = _rotate_heads(k1, k2, cos1, cos2, sin1, sin2, dtype)
    cache = slot * stride_cs + kh[:, None] * stride_ch + j[None, :]
    tl.store(k_cache_ptr + cache, k1, mask=k_ok)
    tl.store(k_cache_ptr + cache + HALF, k2, mask=k_ok)
    v_offsets = k_offsets + NUM_KV_HEADS * HEAD_DIM
    tl.store(v_cache_ptr + cache, tl.load(row + v_offsets, mask=k_ok, other=0.0), mask=k_ok)
    tl.store(v_cache_ptr + cache + HALF, tl.load(row + v_offsets + HALF, mask=k_ok, other=0.0), mask=k_ok)


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
    """qkv: [T, (H + 2 KVH) * D] (a row is q's heads, then k's, then v's); cos, sin: [T, D];
    q_norm / k_norm: the per-head RMSNorm weights [D] (Qwen3) or None (Qwen2). Writes the
    rotated k and the v of token t into cache slot slot_mapping[t]; returns the rotated q
    [T, H, D]."""
    k_cache, v_cache = kv_cache
    if qkv.stride(-1) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("qkv rows and the cache's heads must be contiguous")
    num_tokens = qkv.shape[0]
    cos, sin = cos.reshape(num_tokens, head_dim), sin.reshape(num_tokens, head_dim)
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        raise ValueError("cos and sin must share one layout with contiguous rows")
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    half = head_dim // 2
    _qk_norm_rope_cache_kernel[(num_tokens,)](
        qkv, cos, sin, q_norm if q_norm is not None else cos, k_norm if k_norm is not None else cos,
        slot_mapping, k_cache, v_cache, q,
        eps, qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, H_PAD=triton.next_power_of_2(num_heads),
        KVH_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim, HALF=half,
        HALF_PAD=triton.next_power_of_2(half), QK_NORM=q_norm is not None,
    )
    return q
