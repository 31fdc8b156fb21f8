"""The CUDA (Triton) kernels against the torch reference, on any machine.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py before anything imports Triton) on CPU tensors: the same kernel source, the
same indexing and masking, numpy arithmetic. With a GPU they run compiled.
"""

import math

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="Triton is not installed (the `test` extra has it)")

from qwenkit.kernels.cuda import attention as cuda_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Half precision: float16 everywhere; bfloat16 only compiled (the interpreter's numpy has
# no bfloat16, and its tl.dot reads bfloat16 bits as garbage).
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def paged_cache(contexts: list[int], *, num_kv_heads: int, head_dim: int, block_size: int, dtype, seed: int):
    """A KV pool holding each sequence's context in shuffled blocks; returns the caches,
    block tables (wider than needed, padded with garbage ids) and each context's keys/values."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in contexts) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-n // block_size) for n in contexts) + 2
    k_cache = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    tables, keys, values = [], [], []
    for n in contexts:
        blocks = [order.pop() for _ in range(-(-n // block_size))]
        tables.append(blocks + [num_blocks + 1000] * (width - len(blocks)))  # past the pool: never read
        slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(n)], dtype=torch.long)
        keys.append(k_cache[slots])
        values.append(v_cache[slots])
    return k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), keys, values


def reference(q, keys, values, *, scale):
    """q: [query_len, H, D] at the last query_len positions of keys/values [ctx, KVH, D]."""
    query_len, ctx = q.shape[0], keys.shape[0]
    mask = torch.arange(ctx)[None, :] <= torch.arange(query_len)[:, None] + ctx - query_len
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), keys.float().transpose(0, 1), values.float().transpose(0, 1),
        attn_mask=mask, scale=scale, enable_gqa=True,
    )
    return out.transpose(0, 1)


CASES = [  # (num_heads, num_kv_heads, head_dim, block_size)
    (4, 2, 32, 4),
    (16, 8, 64, 16),
    (8, 1, 128, 16),
    (6, 2, 48, 8),  # head_dim and group not powers of two
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", CASES)
def test_decode_attention(dtype, heads, kv_heads, head_dim, block_size):
    contexts = [1, 5, 70, 0, 33]  # 0: a padding row (a CUDA graph's spare row)
    k_cache, v_cache, tables, keys, values = paged_cache(
        contexts, num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, dtype=dtype, seed=heads
    )
    q = torch.randn(len(contexts), heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    out = cuda_attention.paged_decode_attention(
        q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), tables.to(DEVICE),
        torch.tensor(contexts, dtype=torch.int32, device=DEVICE), block_size=block_size, scale=scale,
    ).cpu()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for b, n in enumerate(contexts):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        ref = reference(q[b : b + 1], keys[b], values[b], scale=scale)[0]
        torch.testing.assert_close(out[b].float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", CASES[:3])
def test_prefill_attention(dtype, heads, kv_heads, head_dim, block_size):
    # (query_len, context_len): a whole prompt, a chunk after a prefix-cache hit, one token,
    # a prompt longer than one query tile.
    shapes = [(7, 7), (20, 45), (1, 9), (80, 80)]
    contexts = [c for _, c in shapes]
    k_cache, v_cache, tables, keys, values = paged_cache(
        contexts, num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, dtype=dtype, seed=7
    )
    q = torch.randn(sum(n for n, _ in shapes), heads, head_dim).to(dtype)
    starts = [0]
    for n, _ in shapes:
        starts.append(starts[-1] + n)
    scale = 1 / math.sqrt(head_dim)
    out = cuda_attention.paged_prefill_attention(
        q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), tables.to(DEVICE),
        torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        torch.tensor(contexts, dtype=torch.int32, device=DEVICE),
        max_query_len=max(n for n, _ in shapes), block_size=block_size, scale=scale,
    ).cpu()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for b in range(len(shapes)):
        ref = reference(q[starts[b] : starts[b + 1]], keys[b], values[b], scale=scale)
        torch.testing.assert_close(out[starts[b] : starts[b + 1]].float(), ref, atol=tol, rtol=tol)


from qwenkit.kernels.cuda import fused  # noqa: E402


def torch_rms_norm(x, w, eps):
    """qwenkit's / transformers' RMSNorm in torch (float32: F.rms_norm, same numbers)."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def close(actual, expected, dtype):
    # Half precision: a unit in the last place (float16 ~1e-3, bfloat16 ~8e-3 of the value;
    # the GPU rounds sums of squares in another order than torch on the CPU).
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(actual.cpu().float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norms(dtype):
    x, residual = torch.randn(5, 96).to(dtype), torch.randn(5, 96).to(dtype)
    w = (1 + 0.2 * torch.randn(96)).to(dtype)
    close(fused.rms_norm(x.to(DEVICE), w.to(DEVICE), 1e-6), torch_rms_norm(x, w, 1e-6), dtype)
    out, summed = fused.add_rms_norm(x.to(DEVICE), residual.to(DEVICE), w.to(DEVICE), 1e-6)
    close(summed, x + residual, dtype)
    close(out, torch_rms_norm(x + residual, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    x = torch.randn(3, 2 * 80).to(dtype)
    close(fused.silu_and_mul(x.to(DEVICE)), F.silu(x[:, :80]) * x[:, 80:], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_norm_rope_cache(dtype, qk_norm):
    heads, kv_heads, head_dim, tokens = 6, 2, 32, 5
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    angles = torch.rand(tokens, head_dim // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    q_w = (1 + 0.2 * torch.randn(head_dim)).to(dtype) if qk_norm else None
    k_w = (1 + 0.2 * torch.randn(head_dim)).to(dtype) if qk_norm else None
    k_cache, v_cache = torch.zeros(12, kv_heads, head_dim, dtype=dtype), torch.zeros(12, kv_heads, head_dim, dtype=dtype)
    slots = torch.tensor([3, 0, 11, 7, 4])
    cache = (k_cache.to(DEVICE), v_cache.to(DEVICE))
    q_out = fused.qk_norm_rope_cache(
        qkv.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), cache, slots.to(DEVICE),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        q_norm=None if q_w is None else q_w.to(DEVICE), k_norm=None if k_w is None else k_w.to(DEVICE), eps=1e-6,
    )
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    if qk_norm:
        q, k = torch_rms_norm(q, q_w, 1e-6), torch_rms_norm(k, k_w, 1e-6)
    close(q_out, rotate(q, cos[:, None], sin[:, None]), dtype)
    close(cache[0][slots], rotate(k, cos[:, None], sin[:, None]), dtype)
    close(cache[1][slots], v, dtype)
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[slots] = False
    assert not cache[0][untouched.to(DEVICE)].any() and not cache[1][untouched.to(DEVICE)].any()
