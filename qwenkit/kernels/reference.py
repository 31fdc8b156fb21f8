"""The kernels in torch: what runs where no native or device kernel applies (another device, a
dtype or layout a kernel does not take, no C compiler, `QWENKIT_NATIVE_KERNELS=0`), and what
the tests hold every kernel against. Same signatures as `qwenkit.kernels`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Large matrices are dequantized and multiplied a block of rows at a time: about this many
# values (4 MiB of float32), so no float copy of a whole matrix is ever made.
BLOCK_VALUES = 1 << 20
INT4_GROUP_SIZE = 32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation in float32, cast back before the weight, as transformers does."""
    if x.dtype == torch.float32:  # one call, the same numbers (the weight multiplies last in both)
        return F.rms_norm(x, weight.shape, weight, eps)
    input_dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(input_dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual), the sum rounded to the dtype before the norm."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NEOX rotary: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[D/2:], x[:D/2])."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [T, KVH, D] into the caches' rows `slot_mapping`, in the caches' dtype.

    index_copy_, not `cache[slots] = ...`: advanced indexing on a large cache was measured at
    milliseconds per call on CPU (torch 2.13)."""
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


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
    """Gathers whole blocks ([B, max_blocks * block_size] keys per sequence), masks the positions
    past each context, one SDPA. Shapes as `qwenkit.kernels.paged_decode_attention`."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    width = block_tables.shape[1] * block_size
    blocks = block_tables.flatten().long()

    def gather(cache: torch.Tensor) -> torch.Tensor:  # -> [B, KVH, width, D]
        whole = cache.shape[0] // block_size * block_size  # past it: the runner's spare padding slot
        paged = cache[:whole].view(-1, block_size, num_kv_heads, head_dim)
        gathered = paged.index_select(0, blocks).view(num_seqs, width, num_kv_heads, head_dim).transpose(1, 2)
        return gathered.to(q.dtype)

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


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ (weight int8 [N, K] * scale bfloat16 [N])^T in x's dtype, dequantized a block
    of rows at a time into a GEMM in x's dtype."""
    out = x.new_empty(x.shape[0], weight.shape[0])
    step = max(1, BLOCK_VALUES // weight.shape[1])
    for start in range(0, weight.shape[0], step):
        rows = slice(start, start + step)
        out[:, rows] = F.linear(x, weight[rows].to(x.dtype)) * scale[rows].to(x.dtype)
    return out


# Q5_0 rows as the kernels take them (csrc/quant.c): 8 rows interleaved; per panel of 8 rows and
# block (176 bytes): the 8 rows' fp16 scales, 4 x 32 bytes of nibbles (vector g, byte 4r + v: value
# 4g + v of row r low, value 4(g + 4) + v high) and 32 bytes of high bits (byte 4r + v, bit q:
# value 4q + v of row r).
Q5_0_PANEL = 8


def _q5_0_split(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stored Q5_0 blocks uint8 [..., 22] -> scale bytes [..., 2], nibbles and high bits [..., 32]."""
    qs = blocks[..., 6:].to(torch.int32)
    qh = sum(blocks[..., 2 + i].to(torch.int64) << (8 * i) for i in range(4))
    nibbles = torch.cat([qs & 0x0F, qs >> 4], dim=-1)
    bits = (qh[..., None] >> torch.arange(32, device=blocks.device)) & 1
    return blocks[..., :2], nibbles, bits.to(torch.int32)


def q5_0_pack(blocks: torch.Tensor, in_features: int) -> torch.Tensor:
    """A file's Q5_0 rows (uint8 [N, in_features / 32 * 22], N a multiple of 8) -> the kernels'
    layout, the same size."""
    n, nb = blocks.shape[0], in_features // 32
    if n % Q5_0_PANEL:
        raise ValueError(f"Q5_0 rows are packed {Q5_0_PANEL} at a time: got {n} rows")
    panels = blocks.reshape(n // Q5_0_PANEL, Q5_0_PANEL, nb, 22).transpose(1, 2)  # [P, nb, 8 rows, 22]
    scales, nibbles, bits = _q5_0_split(panels)  # nibbles, bits [P, nb, 8, 32]
    # [P, nb, q, r, v]: value 4q + v of row r
    nibbles = nibbles.reshape(*nibbles.shape[:3], 8, 4).transpose(2, 3)
    bits = bits.reshape(*bits.shape[:3], 8, 4).transpose(2, 3)
    pairs = (nibbles[:, :, :4] | nibbles[:, :, 4:] << 4).flatten(2)  # [P, nb, 4 * 32]
    planes = (bits << torch.arange(8, device=blocks.device)[:, None, None]).sum(dim=2).flatten(2)  # [P, nb, 32]
    packed = torch.cat([scales.flatten(2), pairs.to(torch.uint8), planes.to(torch.uint8)], dim=2)
    return packed.reshape(n, -1)


def q5_0_unpack(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The inverse of `q5_0_pack`: the kernels' Q5_0 rows -> the file's blocks."""
    n, nb = packed.shape[0], in_features // 32
    p = packed.reshape(n // Q5_0_PANEL, nb, Q5_0_PANEL * 22).to(torch.int64)
    pairs = p[:, :, 16:144].reshape(*p.shape[:2], 4, 8, 4)  # [P, nb, g, r, v]
    nibbles = torch.cat([pairs & 0x0F, pairs >> 4], dim=2)  # [P, nb, q, r, v]
    planes = p[:, :, 144:].reshape(*p.shape[:2], 1, 8, 4)
    bits = (planes >> torch.arange(8, device=packed.device)[:, None, None]) & 1  # [P, nb, q, r, v]
    nibbles = nibbles.transpose(2, 3).flatten(3)  # [P, nb, r, 32 values]
    bits = bits.transpose(2, 3).flatten(3)
    qs = nibbles[..., :16] | nibbles[..., 16:] << 4
    qh = (bits << torch.arange(32, device=packed.device)).sum(dim=-1, keepdim=True)
    qh_bytes = (qh >> torch.tensor([0, 8, 16, 24], device=packed.device)) & 0xFF
    scales = p[:, :, :16].reshape(*p.shape[:2], Q5_0_PANEL, 2)
    stored = torch.cat([scales, qh_bytes, qs], dim=-1).to(torch.uint8)  # [P, nb, r, 22]
    return stored.transpose(1, 2).reshape(n, nb * 22)


def gguf_pack(blocks: torch.Tensor, in_features: int, type_name: str) -> torch.Tensor:
    """A file's GGUF rows of `type_name` -> the layout the kernels take (`qwenkit.kernels.gguf_pack`)."""
    return q5_0_pack(blocks, in_features) if type_name == "Q5_0" else blocks


def gguf_dequantize(blocks: torch.Tensor, in_features: int, type_name: str,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GGUF rows of `type_name` in the kernels' layout (uint8 [N, bytes per row]) -> [N, in_features]
    of `dtype`, by gguf's own code (float32, then rounded as torch's .to() rounds)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if type_name == "Q5_0":
        blocks = q5_0_unpack(blocks, in_features)
    values = dequantize(blocks.cpu().numpy(), GGMLQuantizationType[type_name])
    return torch.from_numpy(values).view(blocks.shape[0], in_features).to(dtype)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ w^T with w packed by `_convert_weight_to_int4pack_for_cpu`, in x's dtype (CPU only)."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, INT4_GROUP_SIZE, scales_and_zeros)
    return y.to(x.dtype)


def fused_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    linear=F.linear,
) -> torch.Tensor:
    """The (token, choice) pairs sorted by expert, one SwiGLU matmul pair per active expert
    on its contiguous rows (`linear`, F.linear's signature), then each token's top_k rows summed
    with their weights.

    x: [T, hidden]; expert_ids, weights: [T, top_k]; gate_up_proj: [E, 2 * I, hidden] (gate rows
    first); down_proj: [E, hidden, I]. index_select/index_copy_ and a batched weighted sum, not
    `x[idx]` and `index_add_`: on CPU those measured 2 ms and 50 ms for a single decode token
    (torch 2.13)."""
    num_tokens, top_k = expert_ids.shape
    intermediate = down_proj.shape[2]
    flat = expert_ids.flatten()
    order = flat.argsort(stable=True)  # (token, choice) pairs grouped by expert
    counts = torch.bincount(flat, minlength=gate_up_proj.shape[0]).tolist()
    xs = x.index_select(0, order // top_k)
    ys = torch.empty_like(xs)
    start = 0
    for expert, n in enumerate(counts):
        if n:
            gate_up = linear(xs[start : start + n], gate_up_proj[expert])
            act = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
            if linear is F.linear:
                torch.mm(act, down_proj[expert].t(), out=ys[start : start + n])
            else:
                ys[start : start + n] = linear(act, down_proj[expert])
            start += n
    per_choice = torch.empty_like(ys).index_copy_(0, order, ys).view(num_tokens, top_k, -1)
    if linear is not F.linear:  # the weighted sum token by token alike, whatever the batch
        return (weights.unsqueeze(-1) * per_choice).sum(1)
    return torch.bmm(weights.unsqueeze(1), per_choice).squeeze(1)


def gguf_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    types: str,
    *,
    dequantize=gguf_dequantize,
) -> torch.Tensor:
    """A sparse layer's experts in GGUF blocks, each expert in use dequantized (`dequantize`,
    `gguf_dequantize`'s signature) and multiplied in x's dtype: the float model's numbers up to
    float rounding. Shapes as `gguf_experts` (qwenkit/kernels/ops/moe.py); types: "gate,up,down"."""
    gate_type, up_type, down_type = types.split(",")
    num_tokens, top_k = expert_ids.shape
    hidden, intermediate = x.shape[1], gate.shape[1]
    flat = expert_ids.flatten()
    per_choice = x.new_empty(num_tokens * top_k, hidden)
    for expert in flat.unique().tolist():
        pairs = (flat == expert).nonzero().squeeze(1)
        xs = x.index_select(0, pairs // top_k)
        g = F.linear(xs, dequantize(gate[expert], hidden, gate_type, x.dtype))
        u = F.linear(xs, dequantize(up[expert], hidden, up_type, x.dtype))
        per_choice[pairs] = F.linear(F.silu(g) * u, dequantize(down[expert], intermediate, down_type, x.dtype))
    return (weights.unsqueeze(-1).to(x.dtype) * per_choice.view(num_tokens, top_k, hidden)).sum(1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2 * I] (gate, then up) -> silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """A fused q/k/v projection's output [T, (H + 2 KVH) D] as q [T, H, D], k, v [T, KVH, D] (views)."""
    num_tokens = qkv.shape[0]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
            v.view(num_tokens, num_kv_heads, head_dim))


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
    """Split qkv, Qwen3's per-head norms (q_norm, k_norm or None), rotary on q and k, k and v into
    the cache rows slot_mapping; returns q. Shapes as `qwenkit.kernels.qk_norm_rope_cache`."""
    q, k, v = split_qkv(qkv, num_heads, num_kv_heads, head_dim)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    q, k = rotary(q, cos, sin), rotary(k, cos, sin)
    write_kv_cache(k, v, *kv_cache, slot_mapping)
    return q


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
    """Per sequence: its context's keys and values gathered through its block table, one causal
    SDPA (query i at position context_len - query_len + i). Shapes as
    `qwenkit.kernels.paged_prefill_attention`."""
    out = torch.empty_like(q)
    starts, lens = query_start_loc.tolist(), context_lens.tolist()
    for b, context_len in enumerate(lens):
        start, end = starts[b], starts[b + 1]
        positions = torch.arange(context_len, device=q.device)
        slots = block_tables[b].long()[positions // block_size] * block_size + positions % block_size
        keys, values = k_cache.index_select(0, slots), v_cache.index_select(0, slots)
        query_len = end - start
        mask = positions[None, :] <= torch.arange(query_len, device=q.device)[:, None] + context_len - query_len
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), keys.to(q.dtype).transpose(0, 1), values.to(q.dtype).transpose(0, 1),
            attn_mask=mask, scale=scale, enable_gqa=True,
        )
        out[start:end] = o.transpose(0, 1)
    return out


def grouped_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    silu_and_mul=silu_and_mul,
) -> torch.Tensor:
    """`fused_experts` without reading the routing back to the host: the (token, choice) pairs
    sorted by expert on the device, each expert's row range found by a binary search, and both
    matmuls one grouped GEMM each over all experts (`torch._grouped_mm`; an expert with no rows
    costs nothing). Shapes stay fixed whatever the routing, so a CUDA graph can hold it."""
    num_tokens, top_k = expert_ids.shape
    num_experts = gate_up_proj.shape[0]
    sorted_ids, order = expert_ids.flatten().sort(stable=True)
    # offs[e]: one past the last row of expert e among the sorted pairs.
    offs = torch.searchsorted(sorted_ids, torch.arange(num_experts, device=x.device), right=True).to(torch.int32)
    xs = x.index_select(0, order // top_k)
    act = silu_and_mul(torch._grouped_mm(xs, gate_up_proj.transpose(1, 2), offs=offs))
    ys = torch._grouped_mm(act, down_proj.transpose(1, 2), offs=offs)
    per_choice = torch.empty_like(ys).index_copy_(0, order, ys).view(num_tokens, top_k, -1)
    return torch.bmm(weights.unsqueeze(1), per_choice).squeeze(1)
