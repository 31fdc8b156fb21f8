"""Attention that reads the paged KV cache in place.

The cache of one layer is `[num_slots, num_kv_heads, head_dim]`; position `p` of sequence
`b` lives in slot `block_tables[b, p // block_size] * block_size + p % block_size`. The
kernels load keys and values straight from those slots, a tile of `BLOCK_N` positions at
a time, with an online softmax (flash attention), so nothing is gathered or copied, and a
block table can be wider than the context it describes (a CUDA graph's static buffer):
entries past `context_lens[b]` are never read.

- `paged_decode_attention`: one query token per sequence. One program per (sequence, KV
  head) computes the `num_heads / num_kv_heads` query heads that share that KV head
  together, so each key and value row is read once.
- `paged_prefill_attention`: packed variable-length queries (`query_start_loc`), each
  query at position `context_len - query_len + i`, causal, against everything cached
  before it in the same pass: a prompt, a chunk of one, or the rest of a prompt after a
  prefix-cache hit. No Python loop per sequence.

float32 inputs take exact (IEEE) dot products, so float32 parity with the reference holds;
half-precision inputs use tensor cores and accumulate in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _attend_tile(q, k_cache_ptr, v_cache_ptr, block_row_ptr, pos, n_ok, keep, kvh, d, d_ok, m_i, l_i, acc, scale,
                 stride_cs, stride_ch, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr):
    """One tile of a sequence's positions `pos` (its block-table row at `block_row_ptr`; `n_ok`:
    those inside the context) folded into the online softmax of the rows of `q` [rows, D_PAD]:
    their keys and values read from their slots, scores where `keep` [rows or 1, BLOCK_N] is
    false masked. Returns the new (m_i, l_i, acc)."""
    block = tl.load(block_row_ptr + pos // BLOCK_SIZE, mask=n_ok, other=0)
    slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
    offsets = slot[:, None] * stride_cs + kvh * stride_ch + d[None, :]
    kv_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_cache_ptr + offsets, mask=kv_ok, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [rows, BLOCK_N]
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + offsets, mask=kv_ok, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
    scale,
    stride_qb, stride_qh, stride_cs, stride_ch, stride_bt, stride_ob, stride_oh,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + b)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    n = tl.arange(0, BLOCK_N)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for start in range(0, context_len, BLOCK_N):
        pos = start + n
        n_ok = pos < context_len
        m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, block_tables_ptr + b * stride_bt, pos, n_ok,
                                     n_ok[None, :], kvh, d, d_ok, m_i, l_i, acc, scale, stride_cs, stride_ch,
                                     BLOCK_SIZE, PRECISION)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # context length 0 (a padding row): zeros
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_ptr, context_lens_ptr, out_ptr,
    scale,
    stride_qt, stride_qh, stride_cs, stride_ch, stride_bt, stride_ot, stride_oh,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    m_block = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(query_start_ptr + b)
    query_len = tl.load(query_start_ptr + b + 1) - q_start
    if m_block * BLOCK_M >= query_len:
        return
    context_len = tl.load(context_lens_ptr + b)
    kvh = h // GROUP
    m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    n = tl.arange(0, BLOCK_N)
    m_ok = m < query_len
    d_ok = d < HEAD_DIM
    q_pos = context_len - query_len + m  # each query's position in its sequence
    q = tl.load(q_ptr + (q_start + m)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    # Keys past this block's last query are masked for every row: stop there.
    end = tl.minimum(context_len, context_len - query_len + (m_block + 1) * BLOCK_M)
    for start in range(0, end, BLOCK_N):
        pos = start + n
        n_ok = pos < end
        causal = n_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, block_tables_ptr + b * stride_bt, pos, n_ok,
                                     causal, kvh, d, d_ok, m_i, l_i, acc, scale, stride_cs, stride_ch,
                                     BLOCK_SIZE, PRECISION)
    out = acc / l_i[:, None]
    tl.store(out_ptr + (q_start + m)[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for half inputs


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("the KV cache pair must share one layout with contiguous heads, and q contiguous heads")


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
    """q: [B, H, D]; caches: [num_slots, KVH, D]; block_tables: [B, >= blocks used] int32;
    context_lens: [B] int32 (0: a padding row, output zeros). Returns [B, H, D]."""
    _check(q, k_cache, v_cache)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    _decode_kernel[(num_seqs, num_kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)),
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), BLOCK_N=64, PRECISION=_precision(q.dtype),
    )
    return out


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
    """q: [T, H, D], sequence b's queries at rows query_start_loc[b]..query_start_loc[b+1]-1
    and positions context_lens[b] - query_len .. context_lens[b] - 1, their keys and values
    already in the cache. Returns [T, H, D]."""
    _check(q, k_cache, v_cache)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = context_lens.shape[0]
    group = num_heads // k_cache.shape[1]
    out = torch.empty_like(q)
    block_m = 64 if max_query_len > 16 else 16
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)), GROUP=group,
        BLOCK_M=block_m, BLOCK_N=64, PRECISION=_precision(q.dtype),
    )
    return out

