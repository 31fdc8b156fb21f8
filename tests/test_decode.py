"""The decode step: paged decode attention read in place equals attention over gathered
slots, and (when compile is used) the compiled decode step equals the eager one."""

import pytest
import torch
import torch.nn.functional as F

from qwenkit import kernels
from qwenkit.kernels import cpu, reference

needs_native = pytest.mark.skipif(cpu.library() is None, reason="no C compiler: the native kernels are not built")


def per_sequence(q, k_cache, v_cache, block_tables, context_lens, *, block_size, scale):
    """Gather each sequence's slots and run SDPA on it alone."""
    outs = []
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        if n == 0:
            outs.append(torch.zeros_like(q[b]))
            continue
        blocks = block_tables[b, : -(-n // block_size)].long()
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:n]
        k, v = k_cache[slots].transpose(0, 1)[None], v_cache[slots].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(q[b : b + 1, :, None], k, v, scale=scale, enable_gqa=True)
        outs.append(o[0, :, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("impl", ["native", "reference"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(14, 2, 64), (4, 4, 32), (16, 8, 128)])
def test_paged_decode_attention_equals_per_sequence_sdpa(impl, num_heads, num_kv_heads, head_dim):
    if impl == "native" and cpu.library() is None:
        pytest.skip("no C compiler: the native kernel is not built")
    fn = kernels.paged_decode_attention if impl == "native" else reference.paged_decode_attention
    g = torch.Generator().manual_seed(0)
    block_size, num_blocks = 16, 64
    k_cache = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=g)
    # Scattered blocks, different lengths (one within the first block, one exactly full, a padding row).
    context_lens = torch.tensor([1, 5, 16, 17, 100, 0], dtype=torch.int32)
    max_blocks = 7
    block_tables = torch.randperm(num_blocks, generator=g)[: 6 * max_blocks].view(6, max_blocks).to(torch.int32)
    q = torch.randn(6, num_heads, head_dim, generator=g)
    scale = head_dim**-0.5
    expected = per_sequence(q, k_cache, v_cache, block_tables, context_lens, block_size=block_size, scale=scale)
    got = fn(q, k_cache, v_cache, block_tables, context_lens, block_size=block_size, scale=scale)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["native", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unwritten_slots_do_not_leak_into_attention(impl, dtype):
    """The pool is torch.empty and the runner adds one spare padding slot past the last
    block: NaN in every slot outside the contexts must not reach the output."""
    if impl == "native" and (dtype != torch.float32 or cpu.library() is None):
        pytest.skip("the native kernel takes float32 and needs a C compiler")
    fn = kernels.paged_decode_attention if impl == "native" else reference.paged_decode_attention
    g = torch.Generator().manual_seed(1)
    block_size, num_blocks, heads, kv_heads, dim = 16, 12, 4, 2, 32
    num_slots = num_blocks * block_size + 1
    k_cache = torch.full((num_slots, kv_heads, dim), float("nan"))
    v_cache = torch.full((num_slots, kv_heads, dim), float("nan"))
    context_lens = torch.tensor([3, 20, 0], dtype=torch.int32)
    block_tables = torch.tensor([[4, 7], [1, 9], [0, 0]], dtype=torch.int32)
    for b, n in enumerate(context_lens.tolist()):
        slots = (block_tables[b].long()[:, None] * block_size + torch.arange(block_size)).flatten()[:n]
        k_cache[slots] = torch.randn(n, kv_heads, dim, generator=g)
        v_cache[slots] = torch.randn(n, kv_heads, dim, generator=g)
    q = torch.randn(3, heads, dim, generator=g)
    kwargs = dict(block_size=block_size, scale=dim**-0.5)
    expected = per_sequence(q, k_cache, v_cache, block_tables, context_lens, **kwargs)
    got = fn(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), block_tables, context_lens, **kwargs)
    assert torch.isfinite(got).all()
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got.float(), expected, **tol)


def test_bfloat16_batched_decode_follows_float32(tiny_checkpoints):
    """Two prompts of different lengths decoded together in bfloat16 (the torch path, as on
    CUDA) start with the float32 greedy tokens; a NaN from an unwritten slot gave token 0."""
    from qwenkit import LLM, SamplingParams

    folder = tiny_checkpoints("qwen3")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = ["Hello there, quick brown fox", "Hi"]
    runs = {
        dtype: [o.token_ids for o in LLM(str(folder), dtype=dtype, progress=False).generate(prompts, params)]
        for dtype in ("float32", "bfloat16")
    }
    assert [t[:4] for t in runs["bfloat16"]] == [t[:4] for t in runs["float32"]]


GREEDY_PARAMS = dict(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.mark.slow  # torch.compile: minutes on two cores
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen3_moe"])
def test_compiled_decode_gives_the_eager_tokens(tmp_path, arch, monkeypatch):
    from tiny import make_checkpoint

    from qwenkit import LLM, SamplingParams

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    make_checkpoint(tmp_path, arch)
    # Buckets 1, 2, 4: three sequences run padded to 4, then two once the short one ends.
    kwargs = dict(dtype="float32", progress=False, max_num_seqs=4, max_model_len=128)
    eager = LLM(str(tmp_path), compile=False, **kwargs)
    compiled = LLM(str(tmp_path), compile=True, **kwargs)
    assert compiled.engine.runner.compiled is not None
    prompts = [[(5 * i + 3 * j) % 200 + 5 for j in range(4 + 9 * i)] for i in range(3)]
    params = [SamplingParams(**GREEDY_PARAMS), SamplingParams(**{**GREEDY_PARAMS, "max_tokens": 4}),
              SamplingParams(**GREEDY_PARAMS)]
    expected = [o.token_ids for o in eager.generate(prompts, params)]
    assert [o.token_ids for o in compiled.generate(prompts, params)] == expected
    assert [compiled.generate(p, params[0])[0].token_ids for p in prompts[:1]] == expected[:1]


@needs_native
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_native_rms_norm_and_rotary_equal_torch(tokens):
    g = torch.Generator().manual_seed(3)
    hidden, heads, kv_heads, dim = 96, 4, 2, 16
    # Strided rows, as a view into a wider tensor; the rotary input is a split of a fused qkv output.
    x = torch.randn(tokens, hidden + 8, generator=g)[:, :hidden] * 3
    weight = torch.randn(hidden, generator=g)
    got = cpu.library().rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(got, F.rms_norm(x, (hidden,), weight, 1e-6), atol=1e-6, rtol=1e-5)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    angles = torch.rand(tokens, 1, dim // 2, generator=g) * 6
    cos, sin = torch.cat((angles, angles), -1).cos() * 1.1, torch.cat((angles, angles), -1).sin() * 1.1
    half = dim // 2
    want = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin
    torch.testing.assert_close(cpu.library().rotary(q, cos, sin), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(kernels.rotary(q, cos, sin), want, atol=1e-6, rtol=1e-5)  # the dispatch takes it
    half_q = q.to(torch.bfloat16)  # the native kernel is float32 only: bfloat16 runs the torch code
    assert torch.equal(kernels.rotary(half_q, cos, sin), reference.rotary(half_q, cos, sin))
