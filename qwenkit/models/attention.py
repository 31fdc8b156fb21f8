"""Attention over a slot-addressed KV cache, with the step's batch layout passed explicitly.

The KV cache of one layer is a pair of tensors `[num_slots, num_kv_heads, head_dim]`.
A slot is where one token's key and value live; a sequence's context is the list of its
slots in position order. The single-sequence loop gives a sequence slots 0..n-1; a paged
cache gives it `block_table[pos // block_size] * block_size + pos % block_size`. The
model does not care which: it writes the step's new keys at `slot_mapping` and reads
each sequence's context through `context_slots`, or, in a decode step (one token per
sequence), through the block tables in `decode`, in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwenkit import kernels


@dataclass(frozen=True)
class DecodeMetadata:
    """A step where every sequence computes one token: the paged cache is read in place."""

    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32; rows padded past each sequence's blocks
    context_lens: torch.Tensor  # [num_seqs] int32
    block_size: int


@dataclass(frozen=True)
class PagedPrefillMetadata:
    """A step with prompt tokens, for kernels that read the paged cache in place (CUDA):
    sequence b's queries are rows query_start_loc[b]..query_start_loc[b + 1] - 1 of the
    step, at the last positions of its context_lens[b] tokens."""

    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    context_lens: torch.Tensor  # [num_seqs] int32
    max_query_len: int
    block_size: int


@dataclass(frozen=True)
class AttentionMetadata:
    """Where the tokens of one forward step come from and where their KV goes.

    The step's tokens are flattened: sequence 0's `query_lens[0]` tokens first, then
    sequence 1's, and so on.
    """

    query_lens: tuple[int, ...]
    # Context length of each sequence after this step (cached tokens + query tokens).
    context_lens: tuple[int, ...]
    # [num_tokens] int64: the cache slot each new token's key/value is written to.
    slot_mapping: torch.Tensor
    # Per sequence: its context's slots ([context_len] int64 tensor), or a slice when
    # they are contiguous (then the cache is read as a view, without a gather).
    # Empty when `decode` is set.
    context_slots: tuple[torch.Tensor | slice, ...] = ()
    decode: DecodeMetadata | None = None
    # Set by the runner where the kernels read the paged cache in place (CUDA).
    paged_prefill: PagedPrefillMetadata | None = None

    @classmethod
    def contiguous(cls, *, start: int, num_tokens: int, device: torch.device | str = "cpu") -> "AttentionMetadata":
        """One sequence whose cache slots are its positions: tokens start..start+num_tokens-1."""
        end = start + num_tokens
        return cls(
            query_lens=(num_tokens,),
            context_lens=(end,),
            slot_mapping=torch.arange(start, end, device=device),
            context_slots=(slice(0, end),),
            paged_prefill=PagedPrefillMetadata(  # blocks of one slot: block p is slot p
                block_tables=torch.arange(end, dtype=torch.int32, device=device)[None],
                query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
                context_lens=torch.tensor([end], dtype=torch.int32, device=device),
                max_query_len=num_tokens,
                block_size=1,
            ),
        )

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def last_token_indices(self) -> torch.Tensor:
        """Index of each sequence's last token in the flattened step (where logits are needed)."""
        ends = torch.tensor(self.query_lens).cumsum(0)
        return ends - 1


def _causal_mask(query_len: int, context_len: int, device: torch.device) -> torch.Tensor:
    """[query_len, context_len] bool: query i (at position context_len - query_len + i) sees keys <= it."""
    offset = context_len - query_len
    q = torch.arange(query_len, device=device)[:, None] + offset
    k = torch.arange(context_len, device=device)[None, :]
    return k <= q


def attention(
    q: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    *,
    scale: float,
) -> torch.Tensor:
    """Causal attention for a flattened step whose keys and values are already in the cache.

    q: [T, num_heads, head_dim]. Returns [T, num_heads * head_dim].
    """
    k_cache, v_cache = kv_cache
    num_tokens, num_heads, head_dim = q.shape
    d, p = meta.decode, meta.paged_prefill
    if d is not None:
        out = kernels.paged_decode_attention(
            q, k_cache, v_cache, d.block_tables, d.context_lens, block_size=d.block_size, scale=scale
        )
    elif p is not None:
        out = kernels.paged_prefill_attention(
            q, k_cache, v_cache, p.block_tables, p.query_start_loc, p.context_lens,
            max_query_len=p.max_query_len, block_size=p.block_size, scale=scale,
        )
    else:
        out = _attention_per_sequence(q, k_cache, v_cache, meta, scale=scale)
    return out.view(num_tokens, num_heads * head_dim)


def _attention_per_sequence(q, k_cache, v_cache, meta: AttentionMetadata, *, scale: float) -> torch.Tensor:
    """One SDPA per sequence over its context's cache rows (`context_slots`)."""
    out = torch.empty_like(q)
    start = 0
    for query_len, context_len, slots in zip(meta.query_lens, meta.context_lens, meta.context_slots):
        qs = q[start : start + query_len].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
        if isinstance(slots, slice):
            ks, vs = k_cache[slots], v_cache[slots]
        else:
            # index_select, not `cache[slots]`: advanced indexing on a large cache was measured
            # at milliseconds per call on CPU (torch 2.13).
            ks, vs = k_cache.index_select(0, slots), v_cache.index_select(0, slots)
        ks, vs = ks.to(q.dtype).transpose(0, 1).unsqueeze(0), vs.to(q.dtype).transpose(0, 1).unsqueeze(0)
        if query_len == 1:
            mask, is_causal = None, False
        elif query_len == context_len:
            mask, is_causal = None, True
        else:
            mask, is_causal = _causal_mask(query_len, context_len, q.device), False
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
        )
        out[start : start + query_len] = o[0].transpose(0, 1)
        start += query_len
    return out
