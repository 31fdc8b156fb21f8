"""Attention over the paged KV cache: the cache write, decode and prefill attention."""

from __future__ import annotations

import torch

from qwenkit.kernels import cpu, cuda, reference
from qwenkit.kernels.ops import Op, cache_holds, native


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
    if cuda.applies(q) and cache_holds(k_cache, q):
        from qwenkit.kernels.cuda import attention

        return attention.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                                block_size=block_size, scale=scale)
    if torch.compiler.is_compiling():
        return _paged_decode_attention_op(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)
    return _paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size=block_size,
                                   scale=scale)


def _paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, *, block_size, scale):
    if (k_cache.dtype in cpu.KV_DTYPES and v_cache.dtype == k_cache.dtype and k_cache.device.type == "cpu"
            and (lib := native(q)) is not None):
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
    if cuda.applies(q) and cache_holds(k_cache, q):
        from qwenkit.kernels.cuda import attention

        return attention.paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens,
                                                 max_query_len=max_query_len, block_size=block_size, scale=scale)
    if (q.device.type == "cpu" and native_prefill_attention(q.shape[-1], k_cache.dtype)
            and v_cache.dtype == k_cache.dtype):
        return cpu.library().paged_prefill_attention(q.float(), k_cache, v_cache, block_tables, query_start_loc,
                                                     context_lens, max_query_len=max_query_len, block_size=block_size,
                                                     scale=scale).to(q.dtype)
    return reference.paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens,
                                             max_query_len=max_query_len, block_size=block_size, scale=scale)


def native_prefill_attention(head_dim: int, kv_dtype: torch.dtype) -> bool:
    """Whether CPU prefill attention runs the native kernel (csrc/attention.c) for this head dim and
    cache dtype: a SIMD variant built (its plain C build is slower than torch's SDPA: 20x at 512
    tokens on the AVX-512 EPYC), the head dim a multiple of 16."""
    lib = cpu.library()
    return lib is not None and lib.isa != "generic" and head_dim % 16 == 0 and kv_dtype in cpu.KV_DTYPES



OPS = {
    "write_kv_cache": Op(write_kv_cache, reference=reference.write_kv_cache),
    "paged_decode_attention": Op(paged_decode_attention, cpu=cpu.Library.paged_decode_attention,
                                 triton="attention:paged_decode_attention", reference=reference.paged_decode_attention),
    "paged_prefill_attention": Op(paged_prefill_attention, cpu=cpu.Library.paged_prefill_attention,
                                  triton="attention:paged_prefill_attention",
                                  reference=reference.paged_prefill_attention),
}
