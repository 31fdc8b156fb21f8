"""qwenkit.kernels: every ISA variant of the C kernels compiles warning-free, and each variant this
CPU runs computes what the torch reference does; the ctypes view of every shared struct matches
its C header; the dispatch and its report.

Variants this CPU cannot run are still compiled (gcc takes the intrinsics given the -m flags);
their code then runs emulated where SIMDe is installed (Debian's libsimde-dev: the AVX-512
intrinsics in portable C; csrc/emulate_amx.h: the AMX tile instructions), else it is skipped,
naming the flags the CPU lacks. benchmarks/cpu_isa_check.py runs the same checks natively (and
a speed comparison) on any machine, without pytest.
"""

from __future__ import annotations

import ctypes
import importlib
import inspect
import pkgutil
import subprocess
from pathlib import Path

import gguf
import pytest
import torch
from gguf.quants import dequantize, quantize
from test_quant import _q8_bound, _weights

from qwenkit import kernels
from qwenkit.kernels import build, cpu, ops, reference
from qwenkit.models.quant import quantize_int8

needs_compiler = pytest.mark.skipif(cpu.library() is None, reason="no C compiler: the native kernels are not built")


def _variant(isa: str) -> cpu.Library:
    """The `isa` variant, built with -Werror (a warning fails here); where this CPU lacks its
    instructions, its emulated build."""
    build.build(isa, extra_flags=("-Werror",))
    if isa in cpu.supported_isas():
        return cpu.load(isa, extra_flags=("-Werror",))
    missing = ", ".join(sorted(cpu.REQUIRED_FLAGS[isa] - cpu.cpu_flags())) or "x86-64"
    if isa not in build.EMULATED_ISA_FLAGS or "avx2" not in cpu.supported_isas():
        pytest.skip(f"{isa} compiled, not run: this CPU lacks {missing}")
    try:
        return cpu.load(isa, emulated=True)
    except build.BuildError as e:
        if "simde/x86/avx512.h" not in str(e):
            raise  # the emulated build itself failed: a defect, not a missing package
        pytest.skip(f"{isa} compiled, not run: this CPU lacks {missing}, and SIMDe (libsimde-dev) is not "
                    "installed to emulate it")


def _assert_q8_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, block: int = 32) -> None:
    """The native kernels' bound against the float64 product with the (de)quantized weight, the
    activations rounded to int8 in blocks of `block`."""
    error = (y.double() - x.double() @ w.double().T).abs()
    bound = _q8_bound(x, w, block)
    assert torch.all(error <= bound), (error / bound).max().item()


@needs_compiler
@pytest.mark.parametrize("isa", list(build.ISA_FLAGS))
@pytest.mark.parametrize("rows", [1, 3, 8, 11, 16, 37])
def test_variant_quantized_matmuls_against_dequantized(isa, rows):
    """int8 and Q5_0 (panels of 8 rows, decoded in registers below 16 rows, unpacked first from 16
    on) against the float product with the dequantized weight; tails of rows (a tile of 3 at 16 and
    37), of int8's output rows (37) and of k (13 blocks of 32)."""
    lib = _variant(isa)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 416, generator=g) * torch.linspace(0.1, 3, 416)
    w = _weights(40, 416)
    q, scale = quantize_int8(w[:37])
    _assert_q8_close(lib.int8_linear(x, q, scale.to(torch.bfloat16)), x, q.double() * scale.double()[:, None])
    blocks = quantize(w.numpy(), gguf.GGMLQuantizationType.Q5_0)
    w5 = torch.from_numpy(dequantize(blocks, gguf.GGMLQuantizationType.Q5_0))
    packed = lib.gguf_pack(torch.from_numpy(blocks), 416, "Q5_0")
    _assert_q8_close(lib.gguf_linear(x, packed, 416, "Q5_0"), x, w5)
    _assert_dequantized(lib, packed, 416, "Q5_0", w5)


def _assert_dequantized(lib, blocks: torch.Tensor, k: int, type_name: str, w: torch.Tensor) -> None:
    """`lib` dequantizes `blocks` to w exactly, and to float16 / bfloat16 (the prefill's GEMM in a
    16-bit model) as torch rounds w."""
    assert torch.equal(lib.gguf_dequantize(blocks, k, type_name), w)
    for dtype in (torch.float16, torch.bfloat16):
        half = lib.gguf_dequantize(blocks, k, type_name, dtype)
        assert half.dtype == dtype and torch.equal(half, w.to(dtype)), (type_name, dtype)


@needs_compiler
@pytest.mark.parametrize("k", [64, 256, 416, 896])
def test_q5_0_interleaving(k):
    """The kernels' Q5_0 rows (`gguf_pack`, 8 rows interleaved): the C code and the torch reference
    pack alike, the reference puts the file's bytes back, and rows that are not a multiple of 8
    are refused; what the layout means is checked by dequantizing it (gguf's values, above)."""
    lib = cpu.library()
    blocks = torch.from_numpy(quantize(_weights(16, k).numpy(), gguf.GGMLQuantizationType.Q5_0))
    packed = lib.gguf_pack(blocks, k, "Q5_0")
    assert packed.shape == blocks.shape and packed.dtype == torch.uint8 and not torch.equal(packed, blocks)
    assert torch.equal(packed, reference.gguf_pack(blocks, k, "Q5_0"))
    assert torch.equal(reference.q5_0_unpack(packed, k), blocks)
    for pack in (lib.gguf_pack, reference.gguf_pack):
        with pytest.raises(ValueError, match="Q5_0 rows are packed 8 at a time: got 9 rows"):
            pack(blocks[:9], k, "Q5_0")
    assert torch.equal(reference.gguf_dequantize(packed, k, "Q5_0"),
                       torch.from_numpy(dequantize(blocks.numpy(), gguf.GGMLQuantizationType.Q5_0)))
    k_quant, _ = _k_quant_blocks("Q4_K", 3, 256, seed=1)
    assert lib.gguf_pack(k_quant, 256, "Q4_K") is k_quant  # the K-quants are taken as stored


@needs_compiler
@pytest.mark.parametrize("isa", list(build.ISA_FLAGS))
def test_variant_q8_0_dequantized_as_gguf_does(isa):
    """The loader's Q8_0 dequantization (Q8_0 matrices become int8) is gguf's, bit for bit: every
    int8 value, scales of both signs, and a short row (one block)."""
    import numpy as np

    lib = _variant(isa)
    raw = np.random.default_rng(4).integers(0, 256, (7 * 13, 34), dtype=np.uint8)
    raw[:, 0:2] = (np.random.default_rng(5).standard_normal((len(raw), 1)) * 1e-2).astype(np.float16).view(np.uint8)
    raw[0, 2:] = np.arange(-128, 128, 8, dtype=np.int8).view(np.uint8)
    expected = torch.from_numpy(dequantize(raw.reshape(7, -1), gguf.GGMLQuantizationType.Q8_0))
    _assert_dequantized(lib, torch.from_numpy(raw.reshape(7, -1)), 416, "Q8_0", expected)
    assert torch.equal(kernels.gguf_dequantize(torch.from_numpy(raw[:1].copy()), 32, "Q8_0"), expected[:1, :32])
    with pytest.raises(TypeError, match="Q8_0 blocks"):
        lib.gguf_dequantize(torch.from_numpy(raw.reshape(7, -1)), 448, "Q8_0")


def _k_quant_blocks(type_name: str, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random valid `type_name` super-blocks for [n, k] (every bit pattern of values, scales and
    mins; the fp16 super-block scales small) and gguf's dequantization of them."""
    import numpy as np

    tensor_type = gguf.GGMLQuantizationType[type_name]
    values, size = gguf.GGML_QUANT_SIZES[tensor_type]
    raw = np.random.default_rng(seed).integers(0, 256, (n * k // values, size), dtype=np.uint8)
    for offset in {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[type_name]:
        raw[:, offset : offset + 2] = np.full((len(raw), 1), 2e-4, np.float16).view(np.uint8)
    raw = raw.reshape(n, -1)
    return torch.from_numpy(raw), torch.from_numpy(dequantize(raw, tensor_type))


@needs_compiler
@pytest.mark.parametrize("isa", list(build.ISA_FLAGS))
@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("k", [512, 1280])
def test_variant_k_quants_against_gguf(isa, type_name, k):
    """K-quant blocks multiplied as stored equal the product with gguf's own dequantization,
    within the activations' int8 rounding (blocks of 256); dequantized exactly as gguf does. Below
    16 rows (AVX-512: 64) decoded in registers 8, 4, 2 and 1 activation rows at a time (AVX-512:
    two weight rows a vector, 21 of them: the last one alone), each row's result the same alone or
    in a batch; from there on unpacked in panels of 8 weight rows, a lane a row, 3 activation rows
    a tile (21 weight rows: a panel's tail; 16, 37 and 67 activation rows: a tile's)."""
    lib = _variant(isa)
    unpack_rows = 16 if isa == "avx2" else 64
    blocks, w = _k_quant_blocks(type_name, 21, k, seed=3)
    _assert_dequantized(lib, blocks, k, type_name, w)
    for rows in (1, 2, 3, 5, 7, 8, 13, 15, 16, 37, 63, 67):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * torch.linspace(0.1, 3, k)
        y = lib.gguf_linear(x, blocks, k, type_name)
        _assert_q8_close(y, x, w, block=256)
        if rows < unpack_rows:
            assert all(torch.equal(lib.gguf_linear(x[i : i + 1], blocks, k, type_name)[0], y[i]) for i in range(rows))


@needs_compiler
def test_k_quant_rows_do_not_depend_on_the_call_under_batch_invariance():
    """The K-quant kernel takes prefill-sized calls too (150 rows) under batch_invariant()
    (--deterministic), each row as it would alone: its decode path at every row count (without
    it, the panels from 16 rows on sum in another order)."""
    blocks, _ = _k_quant_blocks("Q4_K", 21, 512, seed=5)
    x = torch.randn(150, 512, generator=torch.Generator().manual_seed(1))
    if cpu.selected_isa() != "generic":  # the plain C build has the decode path only
        assert not torch.equal(kernels.gguf_linear(x, blocks, 512, "Q4_K")[0],
                               kernels.gguf_linear(x[:1], blocks, 512, "Q4_K")[0])
    with kernels.batch_invariant():
        together = kernels.gguf_linear(x, blocks, 512, "Q4_K")
        assert all(torch.equal(kernels.gguf_linear(x[i : i + 1], blocks, 512, "Q4_K")[0], together[i])
                   for i in range(0, len(x), 7))


@needs_compiler
@pytest.mark.parametrize("isa", list(build.ISA_FLAGS))
def test_variant_rows_do_not_depend_on_the_call(isa):
    """Below 16 rows each activation row's result is bit for bit the same alone or with others
    (int8 tiles of 2 rows; Q5_0 tiles of up to 4): a sequence decodes the same in any batch,
    whatever the variant; Q5_0 at 37 rows too (its unpacked panels compute what its tiles do),
    AMX aside. K of 13 blocks: the AVX-512 int8 path's odd last block."""
    lib = _variant(isa)
    w = _weights(24, 416)
    q, scale = quantize_int8(w[:21])
    blocks = lib.gguf_pack(torch.from_numpy(quantize(w.numpy(), gguf.GGMLQuantizationType.Q5_0)), 416, "Q5_0")
    x = torch.randn(37, 416, generator=torch.Generator().manual_seed(9))
    int8 = lambda t: lib.int8_linear(t, q, scale.to(torch.bfloat16))  # noqa: E731
    q5_0 = lambda t: lib.gguf_linear(t, blocks, 416, "Q5_0")  # noqa: E731
    for fn, rows in ((int8, 13), (q5_0, 13), *([(q5_0, 37)] if isa != "amx" else [])):
        together = fn(x[:rows])
        assert all(torch.equal(fn(x[i : i + 1])[0], together[i]) for i in range(rows))


@needs_compiler
@pytest.mark.parametrize("isa", list(build.ISA_FLAGS))
def test_variant_rows_do_not_depend_on_the_call_when_row_invariant(isa):
    """Under set_row_invariant (--deterministic) at any row count too: 37 rows would otherwise
    take AMX tiles (int8, Q5_0); without it, they differ there."""
    lib = _variant(isa)
    w = _weights(24, 416)
    q, scale = quantize_int8(w)
    blocks = lib.gguf_pack(torch.from_numpy(quantize(w.numpy(), gguf.GGMLQuantizationType.Q5_0)), 416, "Q5_0")
    x = torch.randn(37, 416, generator=torch.Generator().manual_seed(9))
    q5_0 = lambda t: lib.gguf_linear(t, blocks, 416, "Q5_0")  # noqa: E731
    if isa == "amx":
        assert not torch.equal(q5_0(x)[:1], q5_0(x[:1]))  # what the switch changes
    lib.set_row_invariant(True)
    try:
        for fn in (lambda t: lib.int8_linear(t, q, scale.to(torch.bfloat16)), q5_0):
            together = fn(x)
            assert all(torch.equal(fn(x[i : i + 1])[0], together[i]) for i in range(len(x)))
    finally:
        lib.set_row_invariant(False)


@needs_compiler
@pytest.mark.parametrize("isa", list(build.ISA_FLAGS))
def test_variant_attention_norm_rotary_against_reference(isa):
    lib = _variant(isa)
    g = torch.Generator().manual_seed(0)
    block_size, heads, kv_heads, dim = 16, 14, 2, 64
    k_cache, v_cache = (torch.randn(40 * block_size, kv_heads, dim, generator=g) for _ in range(2))
    context_lens = torch.tensor([1, 16, 17, 90, 0], dtype=torch.int32)
    block_tables = torch.randperm(40, generator=g)[:30].view(5, 6).to(torch.int32)
    q = torch.randn(5, heads, dim, generator=g)
    kwargs = dict(block_size=block_size, scale=dim**-0.5)
    torch.testing.assert_close(lib.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, **kwargs),
                               reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                                                **kwargs), atol=1e-5, rtol=1e-4)
    x, weight = torch.randn(5, 96, generator=g) * 3, torch.randn(96, generator=g)
    torch.testing.assert_close(lib.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6), atol=1e-6, rtol=1e-5)
    angles = torch.rand(5, 1, dim // 2, generator=g) * 6
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    torch.testing.assert_close(lib.rotary(q, cos, sin), reference.rotary(q, cos, sin), atol=1e-6, rtol=1e-5)
    gate_up = torch.randn(5, 2 * 52, generator=g) * 4  # 52: 6 vectors of 8 and a tail
    gate_up[0, :6] = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-20, -1e-20])
    torch.testing.assert_close(lib.silu_and_mul(gate_up), reference.silu_and_mul(gate_up), atol=1e-6, rtol=1e-5)


def _steps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their 16-bit dtype lie between a and b (0: equal)."""
    def ordered(t):  # the bit patterns as integers in the order of the values they encode
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return (ordered(a) - ordered(b)).abs()


def _prologue_inputs(dtype, g, *, tokens=21, heads=6, kv_heads=2, dim=120):
    """qkv [T, (H + 2 KVH) D], cos / sin [T, 1, D] at scattered positions, norms [D], slots [T]."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, dim, 2).float() / dim)
    angles = (torch.arange(tokens) * 37.0)[:, None] * inv_freq[None]
    angles = torch.cat((angles, angles), -1)[:, None]
    norms = [(1 + 0.1 * torch.randn(dim, generator=g)).to(dtype) for _ in range(2)]
    slots = torch.randperm(50, generator=g)[:tokens]
    return qkv, angles.cos().to(dtype), angles.sin().to(dtype), norms, slots


@needs_compiler
@pytest.mark.parametrize("isa", list(build.ISA_FLAGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_variant_16_bit_norms_swiglu_prologue_against_torch(isa, dtype):
    """The bfloat16 / float16 kernels round where torch's ops do: nearly every value equals the
    torch reference's, the others are off by float32 summation order or the exp approximation at
    a near-tie: one 16-bit step, two where a product with the norm's weight falls into the binade
    below. Rows of 1000 / 1004 / 120: whole vectors and a tail."""
    lib = _variant(isa)
    g = torch.Generator().manual_seed(7)

    def check(got, want, *, equal_at_least=0.999, max_apart=2):
        assert got.dtype == want.dtype and got.shape == want.shape
        apart = _steps_apart(got, want)
        equal = (apart == 0).float().mean()
        assert apart.max() <= max_apart and equal >= equal_at_least, (apart.max(), equal)

    x, residual = (torch.randn(37, 1000, generator=g) * 3).to(dtype), torch.randn(37, 1000, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(1000, generator=g)).to(dtype)
    check(lib.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
    rows = x[:, :500]  # 1000 apart
    check(lib.rms_norm(rows, weight[:500], 1e-6), reference.rms_norm(rows, weight[:500], 1e-6))
    (y, summed), (want_y, want_summed) = lib.add_rms_norm(x, residual, weight, 1e-6), reference.add_rms_norm(
        x, residual, weight, 1e-6)
    assert torch.equal(summed, want_summed)
    check(y, want_y)
    gate_up = (torch.randn(37, 2 * 1004, generator=g) * 4).to(dtype)
    gate_up[0, :6] = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-20, -1e-20]).to(dtype)
    check(lib.silu_and_mul(gate_up), reference.silu_and_mul(gate_up))

    qkv, cos, sin, (q_norm, k_norm), slots = _prologue_inputs(dtype, g)
    for cache_dtype in (dtype, torch.float32, ({torch.bfloat16, torch.float16} - {dtype}).pop()):
        for norms in ((q_norm, k_norm), (None, None)):  # Qwen3, and Qwen2 (no QK-norm)
            caches = [tuple(torch.zeros(50, 2, 120, dtype=cache_dtype) for _ in range(2)) for _ in range(2)]
            kwargs = dict(num_heads=6, num_kv_heads=2, head_dim=120, q_norm=norms[0], k_norm=norms[1], eps=1e-6)
            q = lib.qk_norm_rope_cache(qkv, cos, sin, caches[0], slots, **kwargs)
            check(q, reference.qk_norm_rope_cache(qkv, cos, sin, caches[1], slots, **kwargs))
            if cache_dtype == torch.float32:
                caches = [tuple(c.to(dtype) for c in pair) for pair in caches]  # values of dtype
            check(caches[0][0], caches[1][0])
            assert torch.equal(caches[0][1], caches[1][1])


@needs_compiler
def test_16_bit_dispatch_and_refusals(monkeypatch):
    """A bfloat16 model's norms, SwiGLU and attention prologue run the native kernels (their
    numbers), the torch reference without them; bad input is refused by name."""
    lib = cpu.library()
    g = torch.Generator().manual_seed(3)
    qkv, cos, sin, (q_norm, k_norm), slots = _prologue_inputs(torch.bfloat16, g)
    x, weight = qkv[:, :240], q_norm.repeat(2)  # rows 1200 apart
    kwargs = dict(num_heads=6, num_kv_heads=2, head_dim=120, q_norm=q_norm, k_norm=k_norm, eps=1e-6)
    caches = [tuple(torch.zeros(50, 2, 120, dtype=torch.float16) for _ in range(2)) for _ in range(2)]
    results = []
    for library, cache in zip((lambda: lib, lambda: None), caches):
        monkeypatch.setattr(cpu, "library", library)
        results.append([kernels.rms_norm(x, weight, 1e-6), *kernels.add_rms_norm(x.contiguous(), x * 2, weight, 1e-6),
                        kernels.silu_and_mul(qkv[:, :480]),
                        kernels.qk_norm_rope_cache(qkv, cos, sin, cache, slots, **kwargs), *cache])
    native, torch_code = results
    assert torch.equal(native[0], lib.rms_norm(x, weight, 1e-6))
    assert torch.equal(native[4], lib.qk_norm_rope_cache(qkv, cos, sin, caches[1], slots, **kwargs))
    for got, want in zip(native, torch_code):
        assert _steps_apart(got, want).max() <= 2
    monkeypatch.setattr(cpu, "library", lambda: _variant("generic"))  # a value at a time: torch is faster
    assert ops.native_16bit(x) is None and ops.native(x.float()) is not None
    with pytest.raises(IndexError, match="outside the cache"):
        lib.qk_norm_rope_cache(qkv, cos, sin, caches[0], slots + 40, **kwargs)
    with pytest.raises(TypeError, match="16-bit kernels"):
        lib.qk_norm_rope_cache(qkv, cos.float(), sin.float(), caches[0], slots, **kwargs)
    with pytest.raises(ValueError, match="qkv must be"):
        lib.qk_norm_rope_cache(qkv[:, :-120], cos, sin, caches[0], slots, **kwargs)
    with pytest.raises(ValueError, match="one shape"):
        lib.add_rms_norm(x.contiguous(), x[:3].contiguous(), weight, 1e-6)


@needs_compiler
@pytest.mark.parametrize("isa", ["avx2", "generic"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_variant_kv_cache_rounding_equals_torch(isa, dtype):
    """What the fused step writes into a 16-bit cache is torch's .to(dtype), bit for bit: ties,
    subnormals, overflow, infinities (NaN: any NaN)."""
    lib = _variant(isa)
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(4099, generator=g) * 10, torch.randn(1000, generator=g) * 1e-6,
                   torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, float("inf"), -float("inf"),
                                 2.0**-24, 2.0**-25, 3 * 2.0**-25, 2.0**-14, 1 + 2.0**-11, 1 + 3 * 2.0**-11,
                                 1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.0e38])])
    assert torch.equal(lib.to_kv_dtype(x, dtype).view(torch.int16), x.to(dtype).view(torch.int16))
    assert lib.to_kv_dtype(torch.tensor([float("nan")]), dtype).isnan().all()


@needs_compiler
@pytest.mark.parametrize("isa", list(build.ISA_FLAGS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 36])  # 36: not a multiple of 8, the plain-C path
def test_variant_attention_reads_16_bit_caches(isa, dtype, dim):
    """A float16 / bfloat16 cache is widened exactly: the kernel equals the reference on it."""
    lib = _variant(isa)
    g = torch.Generator().manual_seed(2)
    block_size, heads, kv_heads = 16, 18, 2  # 9 query heads a kv head: more than one group of 8
    k_cache, v_cache = (torch.randn(20 * block_size, kv_heads, dim, generator=g).to(dtype) for _ in range(2))
    context_lens = torch.tensor([3, 33, 0], dtype=torch.int32)
    block_tables = torch.randperm(20, generator=g)[:9].view(3, 3).to(torch.int32)
    q = torch.randn(3, heads, dim, generator=g)
    kwargs = dict(block_size=block_size, scale=dim**-0.5)
    torch.testing.assert_close(lib.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, **kwargs),
                               reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                                                **kwargs), atol=1e-5, rtol=1e-4)


def _paged_prefill_case(g: torch.Generator, *, heads: int, kv_heads: int, dim: int, block_size: int,
                        seqs: list[tuple[int, int]], dtype: torch.dtype):
    """A paged cache of `dtype` (blocks shuffled) and packed queries for sequences of (cached
    prefix, query tokens): the arguments of paged_prefill_attention."""
    blocks = [-(-(prefix + n) // block_size) for prefix, n in seqs]
    order = torch.randperm(sum(blocks) + 2, generator=g)
    tables, used = [], 0
    for count in blocks:
        tables.append(order[used : used + count].tolist() + [0] * (max(blocks) - count))
        used += count
    k_cache, v_cache = (torch.randn(len(order) * block_size, kv_heads, dim, generator=g).to(dtype) for _ in range(2))
    starts = [0]
    for _, n in seqs:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, dim, generator=g)
    return (q, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32),
            torch.tensor([prefix + n for prefix, n in seqs], dtype=torch.int32))


@needs_compiler
@pytest.mark.parametrize("isa", list(build.ISA_FLAGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, dim, block_size", [(14, 2, 64, 16), (4, 2, 32, 8), (16, 8, 128, 32),
                                                               (5, 5, 80, 16)])
def test_variant_prefill_attention_against_reference(isa, dtype, heads, kv_heads, dim, block_size):
    """Causal prefill attention read in place from the paged cache equals the float64 reference:
    query tokens with and without a cached prefix, one token alone, chunks of keys that cross
    cache blocks and end mid-chunk, tiles of query rows with a tail (7 query heads a kv head: 8
    tokens, 56 rows a tile; one: 48 tokens, and 50 of them), head dims in whole 64-dim tiles and
    with a 16-dim tail (80)."""
    lib = _variant(isa)
    g = torch.Generator().manual_seed(dim + block_size)
    seqs = [(0, 37), (5, 20), (0, 1), (33, 50), (100, 3)]
    q, k_cache, v_cache, tables, starts, lens = _paged_prefill_case(
        g, heads=heads, kv_heads=kv_heads, dim=dim, block_size=block_size, seqs=seqs, dtype=dtype)
    args = dict(block_size=block_size, scale=dim**-0.5)
    out = lib.paged_prefill_attention(q, k_cache, v_cache, tables, starts, lens, max_query_len=50, **args)
    expected = reference.paged_prefill_attention(q.double(), k_cache.double(), v_cache.double(), tables, starts, lens,
                                                 max_query_len=50, **args)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)


@needs_compiler
@pytest.mark.parametrize("isa", list(build.ISA_FLAGS))
def test_variant_prefill_attention_rows_do_not_depend_on_the_step(isa):
    """A query token's output is the same, bit for bit, whether its prompt is attended in one step,
    in two (the second reading the first's keys from the cache), or next to another sequence:
    keys past a row's position weigh exactly zero, and chunks of keys start at fixed positions."""
    lib = _variant(isa)
    g = torch.Generator().manual_seed(9)
    q, k_cache, v_cache, tables, starts, lens = _paged_prefill_case(
        g, heads=14, kv_heads=2, dim=64, block_size=16, seqs=[(0, 90)], dtype=torch.bfloat16)
    args = dict(block_size=16, scale=0.125)
    whole = lib.paged_prefill_attention(q, k_cache, v_cache, tables, starts, lens, max_query_len=90, **args)
    ints = dict(dtype=torch.int32)
    first = lib.paged_prefill_attention(q[:41], k_cache, v_cache, tables, torch.tensor([0, 41], **ints),
                                        torch.tensor([41], **ints), max_query_len=41, **args)
    second = lib.paged_prefill_attention(q[41:], k_cache, v_cache, tables, torch.tensor([0, 49], **ints),
                                         torch.tensor([90], **ints), max_query_len=49, **args)
    assert torch.equal(torch.cat([first, second]), whole)
    beside = lib.paged_prefill_attention(torch.cat([q[:5], q[60:]]), k_cache, v_cache, tables.repeat(2, 1),
                                         torch.tensor([0, 5, 35], **ints), torch.tensor([5, 90], **ints),
                                         max_query_len=30, **args)
    assert torch.equal(beside, torch.cat([whole[:5], whole[60:]]))


def test_prefill_attention_dispatch(monkeypatch):
    """CPU prefill attention takes the native kernel where a SIMD variant is built and the head dim
    is a multiple of 16, in the query's dtype; else torch's SDPA over gathered keys."""
    g = torch.Generator().manual_seed(4)
    q, k_cache, v_cache, tables, starts, lens = _paged_prefill_case(
        g, heads=4, kv_heads=2, dim=32, block_size=16, seqs=[(3, 20)], dtype=torch.bfloat16)
    args = dict(max_query_len=20, block_size=16, scale=32**-0.5)
    expected = reference.paged_prefill_attention(q.double(), k_cache.double(), v_cache.double(), tables, starts, lens,
                                                 **args)
    for dtype in (torch.float32, torch.bfloat16):
        out = kernels.paged_prefill_attention(q.to(dtype), k_cache, v_cache, tables, starts, lens, **args)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), expected, atol=1e-2 if dtype == torch.bfloat16 else 2e-6, rtol=1e-2)
    lib = cpu.library()
    assert kernels.native_prefill_attention(32, torch.bfloat16) == (lib is not None and lib.isa != "generic")
    assert not kernels.native_prefill_attention(36, torch.float32)
    if lib is not None:
        monkeypatch.setattr(cpu, "library", lambda: cpu.load("generic"))
        assert not kernels.native_prefill_attention(32, torch.float32)


@needs_compiler
def test_struct_layouts_match_the_c_header(tmp_path):
    """Every field of the ctypes mirrors of csrc/decode_layers.h sits at the C offset, and each
    struct has the C size (a field missing on either side moves one or the other), as
    tests/csrc/struct_layout.c, compiled against the header, prints them."""
    structs = {"fd_linear": cpu.FdLinear, "fd_layer": cpu.FdLayer, "fd_dims": cpu.FdDims}
    subprocess.run([build.compiler(), "-Wall", "-Wextra", "-Werror", "-I", str(build.CSRC),
                    str(Path(__file__).parent / "csrc" / "struct_layout.c"), "-o", str(tmp_path / "layout")],
                   check=True)
    c_view = dict(line.split() for line in subprocess.run([str(tmp_path / "layout")], capture_output=True,
                                                         text=True, check=True).stdout.splitlines())
    python_view = {c: str(ctypes.sizeof(s)) for c, s in structs.items()}
    python_view |= {f"{c}.{f}": str(getattr(s, f).offset) for c, s in structs.items() for f, _ in s._fields_}
    python_view |= {f"FORMAT_{k.upper()}": str(v) for k, v in cpu.FD_FORMATS.items()}
    assert c_view == python_view


def test_variant_choice_and_report(monkeypatch):
    supported = cpu.supported_isas()
    assert supported[-1] == "generic" and supported[0] == cpu.selected_isa()
    monkeypatch.setenv("QWENKIT_CPU_ISA", "generic")
    assert cpu.selected_isa() == "generic"
    unsupported = [isa for isa in build.ISA_FLAGS if isa not in supported]
    if unsupported:
        monkeypatch.setenv("QWENKIT_CPU_ISA", unsupported[0])
        with pytest.raises(ValueError, match=f"this CPU runs only {', '.join(supported)}"):
            cpu.selected_isa()
    monkeypatch.setenv("QWENKIT_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="choose one of amx, avx512_vnni, avx2, generic"):
        cpu.selected_isa()
    report = kernels.describe()
    lib = cpu.library()
    assert report["cpu_isa"] == (lib.isa if lib else "none (torch code)")
    monkeypatch.setattr(cpu, "library", lambda: None)
    assert kernels.describe()["int8_linear"].startswith("torch")
    assert "torch code" in kernels.summary()


def test_without_native_kernels_every_kernel_runs_torch_code(monkeypatch):
    """No compiler (or QWENKIT_NATIVE_KERNELS=0): the dispatch returns the reference's numbers."""
    monkeypatch.setattr(cpu, "library", lambda: None)
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(3, 64, generator=g), torch.randn(64, generator=g)
    assert torch.equal(kernels.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
    blocks = torch.from_numpy(quantize(torch.randn(8, 256, generator=g).numpy(), gguf.GGMLQuantizationType.Q5_0))
    assert torch.equal(kernels.gguf_pack(blocks, 256, "Q5_0"), reference.gguf_pack(blocks, 256, "Q5_0"))
    blocks = kernels.gguf_pack(blocks, 256, "Q5_0")
    assert torch.equal(kernels.gguf_dequantize(blocks, 256, "Q5_0"), reference.gguf_dequantize(blocks, 256, "Q5_0"))
    assert not kernels.has_gguf_kernel("Q5_0")


def _parameters(fn, *, method: bool = False) -> list[tuple]:
    params = list(inspect.signature(fn).parameters.values())[1 if method else 0:]
    return [(p.name, p.kind, p.default) for p in params]


def test_each_ops_implementations_take_its_signature():
    """One signature an op: its C (a cpu.Library method), Triton and torch reference
    implementations take the parameters of the entry model code calls, by name, kind and default."""
    seen = {}
    for info in pkgutil.iter_modules(ops.__path__):
        module = importlib.import_module(f"{ops.__name__}.{info.name}")
        for name, op in module.OPS.items():
            assert getattr(kernels, name) is op.entry, f"kernels.{name} is not {module.__name__}.{name}"
            want = _parameters(op.entry)
            for kind, fn in op.implementations().items():
                assert _parameters(fn, method=kind == "cpu") == want, f"{name}: its {kind} implementation"
            seen[name] = set(op.implementations())
    assert {name for name, kinds in seen.items() if len(kinds) >= 2} >= {
        "rms_norm", "add_rms_norm", "silu_and_mul", "rotary", "qk_norm_rope_cache", "paged_decode_attention",
        "paged_prefill_attention", "int8_linear", "gguf_pack", "gguf_dequantize"}
    assert seen["paged_decode_attention"] == {"cpu", "triton", "reference"}


def test_the_signature_check_sees_a_drift():
    def entry(x, weight, eps): ...
    def drifted(x, weight, eps=1e-6): ...
    assert _parameters(entry) != _parameters(drifted)
