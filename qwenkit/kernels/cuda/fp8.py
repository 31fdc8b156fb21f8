"""A Triton matmul that reads e4m3 weights as stored (qwenkit/models/prequantized.py: `weight`
[N, K], a float32 scale per block of rows and `block_k` columns, `row_block` [N] naming each row's
scale row) and dequantizes them per tile in registers: each byte decoded to float32 by its bits
(sign, 4 exponent bits with bias 7, 3 mantissa bits), times its block's scale, rounded to the
activations' dtype, then the dot. The same numbers as the reference (`dequantize_fp8` then a
matmul), reading one byte a weight; the bits are decoded in integer registers so that the same
source runs under Triton's interpreter (whose numpy has no float8) and on cards without FP8 units.
A Hopper kernel on FP8 tensor cores (activations quantized too, `torch._scaled_mm`) is later work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _e4m3_to_float(byte):
    """uint8 e4m3fn bits (int32 here) -> float32, exactly; 0x7f / 0xff (NaN) are not decoded."""
    sign = (byte >> 7) & 1
    exponent = (byte >> 3) & 15
    mantissa = byte & 7
    normal = tl.cast(((exponent + 120) << 23) | (mantissa << 20), tl.float32, bitcast=True)  # 2^(e-7) (1 + m/8)
    value = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)  # subnormal: m 2^-9
    return tl.where(sign == 1, -value, value)


@triton.jit
def _fp8_weight_matmul(x_ptr, w_ptr, scale_ptr, row_block_ptr, y_ptr, M, N, K, stride_xm, stride_ym, scale_cols,
                       BLOCK_SCALE_K: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    scale_row = tl.load(row_block_ptr + rn, mask=n_ok, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        kn_ok = k_ok[:, None] & n_ok[None, :]
        byte = tl.load(w_ptr + rn[None, :] * K + rk[:, None], mask=kn_ok, other=0).to(tl.int32)  # W^T tile
        scale = tl.load(scale_ptr + scale_row[None, :] * scale_cols + (rk // BLOCK_SCALE_K)[:, None], mask=kn_ok,
                        other=0.0).to(tl.float32)
        w = (_e4m3_to_float(byte) * scale).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def fp8_weight_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, row_block: torch.Tensor,
                      block_k: int) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype; weight e4m3 [N, K], scale [R, ceil(K / block_k)], row_block [N]."""
    x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    _fp8_weight_matmul[grid](
        x, weight.view(torch.uint8), scale, row_block, y, m, n, k, x.stride(0), y.stride(0), scale.shape[1],
        BLOCK_SCALE_K=block_k, IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64,
    )
    return y
