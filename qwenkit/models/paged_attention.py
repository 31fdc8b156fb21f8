"""Decode attention read in place from the paged KV cache.

A decode step has one query token per sequence. Its keys and values sit in cache blocks
scattered over the pool; gathering them into a new tensor every step copies the whole
history of every sequence, every layer, every token. On CPU a small C kernel
(`_SOURCE`, built once by `qwenkit.models.native`) walks
the block table instead and reads each key and value row exactly once. Elsewhere (CUDA,
half precision, or no compiler) `paged_decode_attention_reference` gathers whole
blocks and calls SDPA.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from qwenkit.models import native

# One OpenMP task per (sequence, kv head): scores of its `G` query heads against the
# context's keys, a softmax, then the weighted sum of the values (built by `native`).
_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* q, out: [B, H, D]; k_cache, v_cache: [num_slots, KVH, D]; block_tables: [B, max_blocks];
   context_lens: [B]. Position l of sequence b is slot block_tables[b][l / block_size] * block_size
   + l % block_size. */
void paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                                const int32_t *block_tables, const int32_t *context_lens, float *out,
                                int B, int H, int KVH, int D, int block_size, int max_blocks, float scale) {
    const int G = H / KVH;
    const int64_t row = (int64_t)KVH * D;  /* floats from one slot to the next */
    #pragma omp parallel for schedule(dynamic, 1)
    for (int task = 0; task < B * KVH; task++) {
        const int b = task / KVH, kvh = task % KVH, L = context_lens[b];
        const int32_t *table = block_tables + (int64_t)b * max_blocks;
        const float *qb = q + ((int64_t)b * H + kvh * G) * D;
        float *ob = out + ((int64_t)b * H + kvh * G) * D;
        memset(ob, 0, sizeof(float) * G * D);
        if (L <= 0) continue;
        float *scores = malloc(sizeof(float) * G * L);  /* [G, L] */
        for (int start = 0; start < L; start += block_size) {
            const float *k = k_cache + (int64_t)table[start / block_size] * block_size * row + kvh * D;
            const int n = L - start < block_size ? L - start : block_size;
            for (int i = 0; i < n; i++, k += row)
                for (int g = 0; g < G; g++) {
                    const float *qg = qb + g * D;
                    float s = 0.f;
                    for (int d = 0; d < D; d++) s += qg[d] * k[d];
                    scores[g * L + start + i] = s * scale;
                }
        }
        for (int g = 0; g < G; g++) {
            float *sg = scores + g * L, m = sg[0], sum = 0.f;
            for (int l = 1; l < L; l++) m = sg[l] > m ? sg[l] : m;
            for (int l = 0; l < L; l++) { sg[l] = expf(sg[l] - m); sum += sg[l]; }
            const float inv = 1.f / sum;
            for (int l = 0; l < L; l++) sg[l] *= inv;
        }
        for (int start = 0; start < L; start += block_size) {
            const float *v = v_cache + (int64_t)table[start / block_size] * block_size * row + kvh * D;
            const int n = L - start < block_size ? L - start : block_size;
            for (int i = 0; i < n; i++, v += row)
                for (int g = 0; g < G; g++) {
                    const float p = scores[g * L + start + i];
                    float *og = ob + g * D;
                    for (int d = 0; d < D; d++) og[d] += p * v[d];
                }
        }
        free(scores);
    }
}
"""

@functools.cache
def _native_kernel():
    """The compiled kernel's function, or None (then the reference runs)."""
    lib = native.load_library("paged_attention", _SOURCE)
    if lib is None:
        return None
    fn = lib.paged_decode_attention_f32
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 6 + [ctypes.c_float]
    return fn


def native_kernel_available() -> bool:
    return _native_kernel() is not None


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
    """One query token per sequence against its cached context.

    q: [B, H, D]; k_cache, v_cache: [num_slots, KVH, D]; block_tables: [B, max_blocks]
    int32 (entries past a sequence's blocks are ignored); context_lens: [B] int32.
    Returns [B, H, D]; a sequence with context length 0 gets zeros.
    """
    fn = _native_kernel() if q.device.type == "cpu" and k_cache.dtype == torch.float32 else None
    if fn is None:
        return paged_decode_attention_reference(
            q, k_cache, v_cache, block_tables, context_lens, block_size=block_size, scale=scale
        )
    q = q.contiguous()
    block_tables, context_lens = block_tables.contiguous(), context_lens.contiguous()
    if q.dtype != torch.float32 or block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise TypeError("the native kernel takes float32 q and int32 block tables and context lengths")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    num_seqs, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(),
       out.data_ptr(), num_seqs, num_heads, k_cache.shape[1], head_dim, block_size, block_tables.shape[1], scale)
    return out


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """`paged_decode_attention` in torch: gathers whole blocks ([B, max_blocks * block_size]
    keys per sequence) and masks the positions past each context."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    width = block_tables.shape[1] * block_size
    blocks = block_tables.flatten().long()

    def gather(cache: torch.Tensor) -> torch.Tensor:  # -> [B, KVH, width, D]
        whole = cache.shape[0] // block_size * block_size  # past it: the runner's spare padding slot
        paged = cache[:whole].view(-1, block_size, num_kv_heads, head_dim)
        return paged.index_select(0, blocks).view(num_seqs, width, num_kv_heads, head_dim).transpose(1, 2)

    positions = torch.arange(width, device=q.device)
    mask = (positions[None, :] < context_lens[:, None].to(q.device))[:, None, None, :]  # [B, 1, 1, width]
    # Slots past a context may never have been written (the pool is torch.empty). A NaN key
    # there survives the mask where SDPA adds it (NaN + -inf; the bfloat16 CPU kernel does),
    # and a NaN value survives its zero weight (0 * NaN): both are zeroed where masked.
    unwritten = ~mask[:, :, 0, :, None]  # [B, 1, width, 1]
    keys = gather(k_cache).masked_fill(unwritten, 0.0)
    values = gather(v_cache).masked_fill(unwritten, 0.0)
    out = F.scaled_dot_product_attention(
        q[:, :, None], keys, values, attn_mask=mask, scale=scale, enable_gqa=True
    )[:, :, 0]
    # A fully masked row (context length 0: a padding slot) comes out NaN.
    return torch.where(context_lens[:, None, None].to(q.device) > 0, out, 0.0)


@torch.library.custom_op("qwenkit::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """The cache write and `paged_decode_attention` as one opaque op, for torch.compile:
    the graph calls it in place (the cache is never copied) and does not trace the kernel."""
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)
    return paged_decode_attention(
        q, k_cache, v_cache, block_tables, context_lens, block_size=block_size, scale=scale
    )


@decode_attention_op.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, block_size, scale):
    return torch.empty_like(q)
