"""A Triton matmul that reads 4- or 8-bit integer weights as stored (qwenkit/models/prequantized.py's
layout, GPTQ's: `qweight` int32 [K * bits / 32, N], `scales` [G, N], `qzeros` int32
[G, N * bits / 32] or none) and dequantizes them per tile in registers: a K x N tile of words is
read once, 32 / bits values shifted out of each, w = (q - z) * s, then multiplied with the tile of
activations. Decode reads bits / 8 bytes a weight where dequantizing first (the torch reference,
`StoredMatrix.matmul`) writes and reads back 2 or 4 more.

Same numbers as the reference: the weights are rounded to the activations' dtype before the dot,
as the reference rounds its dequantized matrix, and float32 activations multiply in full float32
(`input_precision="ieee"`, not TF32). Groups reordered by g_idx are not read here (the reference
takes them). Tested under Triton's interpreter (tests/test_prequantized.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int_weight_matmul(x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                       GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                       IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        kn_ok = k_ok[:, None] & n_ok[None, :]
        words = tl.load(qweight_ptr + (rk // PER_WORD)[:, None] * N + rn[None, :], mask=kn_ok, other=0)
        q = (words >> ((rk % PER_WORD) * BITS)[:, None]) & MASK  # [BLOCK_K, BLOCK_N]
        group = rk // GROUP
        scale = tl.load(scales_ptr + group[:, None] * N + rn[None, :], mask=kn_ok, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero_words = tl.load(qzeros_ptr + group[:, None] * (N // PER_WORD) + (rn // PER_WORD)[None, :],
                                 mask=kn_ok, other=0)
            zero = ((zero_words >> ((rn % PER_WORD) * BITS)[None, :]) & MASK) + ZERO_OFFSET
        else:
            zero = 1 << (BITS - 1)
        w = ((q - zero).to(tl.float32) * scale).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def int_weight_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, *,
                      bits: int, group_size: int, zero_offset: int) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype, W as above (group_size 0: one group per row)."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[1]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 64
    block_n, block_k = 64, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int_weight_matmul[grid](
        x, qweight, scales, qweight if qzeros is None else qzeros, y, m, n, k, x.stride(0), y.stride(0),
        GROUP=group_size or k, BITS=bits, HAS_ZEROS=qzeros is not None, ZERO_OFFSET=zero_offset,
        IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y
