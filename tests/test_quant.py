"""Weight-only quantization (qwenkit/models/quant.py): each quantized matmul against the float
matmul of its own dequantized weight, with the error bound of each format; quantized loads of
tiny safetensors and GGUF checkpoints against the float load; the load-time choices.

Error bounds, with S = sum_k |x_k| |w_nk| (the size of the dot product's terms):
- native int8 kernel (CPU, any rows): activations rounded to int8 in blocks of 32, each x_k off
  by at most amax(block) / 254, so |y - y_ref| <= sum_k |w_nk| amax(block of k) / 254 + 1e-5 S.
- torch's int8 / int4 kernels (CPU, <= MAX_KERNEL_TOKENS rows): activations and outputs rounded
  to bfloat16 (relative 2^-9 each), so |y - y_ref| <= 2^-8 S.
- int8 dequantized path (more rows): float32 throughout, |y - y_ref| <= 1e-5 S.
- quantizing: int8 |w - q s| <= s / 2 with s = amax / 127 rounded up to bfloat16; int4
  |w - ((q - 8) s + z)| <= s / 2 + |z| 2^-8 (z is rounded to bfloat16); GGUF Q4_K into int4
  exactly, up to the bfloat16 rounding of s and z.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
from test_gguf import RANDOM_BLOCK_TYPES, random_blocks, write_gguf
from tiny import make_checkpoint

from qwenkit import LLM, SamplingParams
from qwenkit.errors import ModelLoadError, QwenkitError
from qwenkit.loader import load_model
from qwenkit.loader.gguf import GGUFCheckpoint
from qwenkit.loader.quantization import K_QUANTS_STORED_ISAS, plan_quantization
from qwenkit.model_files import resolve_model
from qwenkit import kernels
from qwenkit.kernels import cpu, reference
from qwenkit.models import quant
from qwenkit.models.attention import AttentionMetadata
from qwenkit.models.quant import GGUFEmbedding, QuantEmbedding, QuantLinear

transformers = pytest.importorskip("transformers")

BF16_BOUND = 2.0**-8
F32_BOUND = 1e-5


def _terms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """S[m, n] = sum_k |x[m, k]| |w[n, k]|."""
    return x.double().abs() @ w.double().abs().T


def _assert_matmul_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bound: float) -> None:
    reference = x.double() @ w.double().T
    error = (y.double() - reference).abs()
    assert torch.all(error <= bound * _terms(x, w) + 1e-12), (error / _terms(x, w)).max().item()


def _q8_bound(x: torch.Tensor, w: torch.Tensor, block: int = 32) -> torch.Tensor:
    """The native kernels' bound: x rounded to int8 in blocks of `block` along k (32; the
    K-quant kernels: 256, a super-block, as llama.cpp's Q8_K) moves each x_k by at most
    amax(|x| over its block) / 254; plus float32 rounding."""
    k = x.shape[1]
    amax = torch.stack([b.abs().amax(dim=1) for b in x.double().split(block, dim=1)], dim=1)
    step = amax.repeat_interleave(block, dim=1)[:, :k] / 254
    return step @ w.double().abs().T + F32_BOUND * _terms(x, w)


def _assert_int8_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """An int8 matmul by whichever kernel runs here: the native one, else torch's bfloat16 one."""
    if cpu.library() is not None:
        error = (y.double() - x.double() @ w.double().T).abs()
        assert torch.all(error <= _q8_bound(x, w)), (error / _q8_bound(x, w)).max().item()
    else:
        _assert_matmul_close(y, x, w, BF16_BOUND)


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3] *= 20  # an outlier row
    w[:, 7] += 0.3  # a column offset, for int4's asymmetric groups
    return w


def _torch_int8_paths(monkeypatch) -> None:
    """Without the native kernel: torch's bfloat16 kernel up to MAX_KERNEL_TOKENS rows, then dequantizing."""
    monkeypatch.setattr("qwenkit.kernels.ops.linear.MAX_NATIVE_KERNEL_TOKENS", 0)


@pytest.mark.parametrize("rows", [1, 5, kernels.MAX_KERNEL_TOKENS, kernels.MAX_KERNEL_TOKENS + 1, 70])
def test_int8_linear_against_dequantized(rows, monkeypatch):
    _torch_int8_paths(monkeypatch)
    w = _weights(96, 128)
    q, scale = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and torch.equal(scale.to(torch.bfloat16).float(), scale)  # exact in bfloat16
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(1))
    y = kernels.int8_linear(x, q, scale.to(torch.bfloat16))
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    bound = BF16_BOUND if rows <= kernels.MAX_KERNEL_TOKENS else F32_BOUND
    _assert_matmul_close(y, x, q.float() * scale[:, None], bound)


needs_native = pytest.mark.skipif(cpu.library() is None, reason="no C compiler: the native kernel is not built")


@needs_native
@pytest.mark.parametrize("rows,n,k", [(1, 96, 128), (2, 99, 896), (5, 7, 100), (16, 130, 64), (33, 4, 31), (70, 96, 160)])
def test_native_int8_linear_against_dequantized(rows, n, k):
    """Activations rounded to int8 in blocks of 32 along k (the last block may be short): each
    x_k is off by at most amax(|x| over its block) / 254, so |y - y_ref| <= sum_k |w_nk| that + float
    rounding. Shapes cover tails: rows not a multiple of 2, n of 4, k of 32 or of 8."""
    w = _weights(max(n, 4), k)[:n] if n >= 4 else torch.randn(n, k, generator=torch.Generator().manual_seed(2))
    q, scale = quant.quantize_int8(w)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, k)
    x[0, 5] = 40.0  # an outlier: only its own block loses precision
    y = kernels.int8_linear(x, q, scale.to(torch.bfloat16))
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    w_ref = q.double() * scale.double()[:, None]
    bound = _q8_bound(x, w_ref)
    error = (y.double() - x.double() @ w_ref.T).abs()
    assert torch.all(error <= bound), (error / bound).max().item()
    assert (error > 0).any()  # the activations really were rounded: the bound is not vacuous


@needs_native
@pytest.mark.parametrize("rows,n,k", [(1, 8, 64), (2, 16, 896), (3, 8, 96), (4, 8, 32), (9, 136, 256), (12, 40, 96),
                                      (21, 8, 64)])
def test_native_q5_0_linear_against_gguf(rows, n, k, monkeypatch):
    """GGUF Q5_0 blocks (8 rows interleaved for the kernels by gguf_pack) multiplied in place equal
    the product with gguf's own dequantization, within the activations' int8 rounding: decoded in
    registers (< 16 rows: tiles of 4 and their tails) and unpacked first (>= 16 rows: 21 rows,
    tiles of 3 and a tail)."""
    from gguf.quants import dequantize, quantize

    q5 = gguf.GGMLQuantizationType.Q5_0
    blocks = quantize(_weights(max(n, 4), k)[:n].numpy(), q5)
    w = torch.from_numpy(dequantize(blocks, q5))
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, k)
    blocks = kernels.gguf_pack(torch.from_numpy(blocks), k, "Q5_0")
    y = kernels.gguf_linear(x, blocks, k, "Q5_0")
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    error = (y.double() - x.double() @ w.double().T).abs()
    assert torch.all(error <= _q8_bound(x, w)), (error / _q8_bound(x, w)).max().item()
    # The dequantizing path (no kernel: other devices, kernels off) gives the float product.
    assert torch.equal(kernels.gguf_dequantize(blocks, k, "Q5_0"), w)
    monkeypatch.setattr("qwenkit.kernels.ops.linear.MAX_NATIVE_KERNEL_TOKENS", 0)
    _assert_matmul_close(kernels.gguf_linear(x, blocks, k, "Q5_0"), x, w, F32_BOUND)


@needs_native
@pytest.mark.parametrize("rows", [3, 150])
def test_k_quant_linear_takes_the_kernel_at_every_row_count(rows, monkeypatch):
    """K-quant blocks: the native kernel for decode and prefill-sized calls alike (the int8
    rounding of the activations, in blocks of 256); without it, gguf-exact dequantization and a
    float32 GEMM (float32 rounding)."""
    from test_kernels import _k_quant_blocks

    blocks, w = _k_quant_blocks("Q4_K", 40, 512, seed=4)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(1))
    y = kernels.gguf_linear(x, blocks, 512, "Q4_K")
    error = (y.double() - x.double() @ w.double().T).abs()
    assert torch.all(error <= _q8_bound(x, w, 256)) and (error > 1e-5 * _terms(x, w)).any()
    monkeypatch.setattr("qwenkit.kernels.ops.linear.MAX_NATIVE_KERNEL_TOKENS", 0)
    _assert_matmul_close(kernels.gguf_linear(x, blocks, 512, "Q4_K"), x, w, F32_BOUND)


@needs_native
@pytest.mark.parametrize("rows", [3, 9, 13])
def test_native_kernel_rows_do_not_depend_on_the_call(rows):
    """Below the unpacking threshold each activation row's result is bit for bit the same alone
    or with others (int8 tiles of 2 rows, Q5_0 tiles of 4): a sequence decodes the same in any batch."""
    from gguf.quants import quantize

    w = _weights(40, 896)
    x = torch.randn(rows, 896, generator=torch.Generator().manual_seed(6))
    blocks = kernels.gguf_pack(torch.from_numpy(quantize(w.numpy(), gguf.GGMLQuantizationType.Q5_0)), 896, "Q5_0")
    q, scale = quant.quantize_int8(w)
    lib = cpu.library()
    for fn in (lambda t: lib.gguf_linear(t, blocks, 896, "Q5_0"), lambda t: lib.int8_linear(t, q, scale.to(torch.bfloat16))):
        together = fn(x)
        assert all(torch.equal(fn(x[i : i + 1])[0], together[i]) for i in range(rows))


@needs_native
def test_native_kernels_plain_c_build_equals_simd(tmp_path):
    """The plain C code (CPUs without AVX2: the source built with QK_NO_SIMD) computes what the
    AVX2 code does, up to float summation order."""
    from gguf.quants import dequantize, quantize

    plain, lib = cpu.load("generic", tmp_path), cpu.library()
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(2))
    w = _weights(7, 96)
    q, scale = quant.quantize_int8(w)
    scale = scale.to(torch.bfloat16)
    torch.testing.assert_close(plain.int8_linear(x, q, scale), lib.int8_linear(x, q, scale), atol=1e-5, rtol=1e-5)
    stored = quantize(_weights(16, 416).numpy(), gguf.GGMLQuantizationType.Q5_0)  # two panels of 8 rows
    blocks = lib.gguf_pack(torch.from_numpy(stored), 416, "Q5_0")
    assert torch.equal(plain.gguf_pack(torch.from_numpy(stored), 416, "Q5_0"), blocks)
    assert torch.equal(plain.gguf_dequantize(blocks, 416, "Q5_0"),
                       torch.from_numpy(dequantize(stored, gguf.GGMLQuantizationType.Q5_0)))
    for rows in (5, 8, 17):  # decoded in registers (tiles of 4) in the AVX2 build; unpacked first
        x = torch.randn(rows, 416, generator=torch.Generator().manual_seed(rows))
        torch.testing.assert_close(plain.gguf_linear(x, blocks, 416, "Q5_0"), lib.gguf_linear(x, blocks, 416, "Q5_0"),
                                   atol=1e-5, rtol=1e-5)


@needs_native
def test_native_int8_linear_in_bfloat16_and_compiled():
    w = _weights(64, 96)
    q, scale = quant.quantize_int8(w)
    scale = scale.to(torch.bfloat16)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(4))
    want = kernels.int8_linear(x, q, scale)
    got = kernels.int8_linear(x.to(torch.bfloat16), q, scale)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)
    compiled = torch.compile(lambda t: kernels.int8_linear(t, q, scale) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), want * 2)
    from gguf.quants import quantize

    blocks = kernels.gguf_pack(torch.from_numpy(quantize(w.numpy(), gguf.GGMLQuantizationType.Q5_0)), 96, "Q5_0")
    compiled = torch.compile(lambda t: kernels.gguf_linear(t, blocks, 96, "Q5_0") * 2, fullgraph=True,
                             backend="eager")
    torch.testing.assert_close(compiled(x), kernels.gguf_linear(x, blocks, 96, "Q5_0") * 2)


@pytest.mark.parametrize("rows", [1, 8, 70])
def test_int4_linear_against_dequantized(rows):
    w = _weights(64, 256)
    q, scale, zero = quant.quantize_int4(w)
    w_q = quant.dequantize_int4(q, scale, zero)
    groups = scale.repeat_interleave(32, dim=1), zero.repeat_interleave(32, dim=1)
    assert torch.all((w_q - w).abs() <= groups[0] / 2 + groups[1].abs() * 2**-8 + 1e-7)
    layer = QuantLinear(256, [64], bias=False, dtype=torch.float32, format=quant.INT4)
    layer.weight.weight_loader(layer.weight, w, None)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(1))
    _assert_matmul_close(layer(x), x, w_q, BF16_BOUND)


def test_quant_linear_fused_shards_and_bias():
    """qkv-style shards quantize into their own rows; the bias stays float."""
    w = _weights(96, 64)
    bias = torch.randn(96)
    for format in (quant.INT8, quant.INT4):
        layer = QuantLinear(64, [64, 16, 16], bias=True, dtype=torch.float32, format=format,
                            shard_names=("q", "k", "v"))
        for shard, rows in zip("kvq", (slice(64, 80), slice(80, 96), slice(0, 64))):  # any order
            assert layer.weight.weight_loader(layer.weight, w[rows], shard) == {shard}
            layer.bias.weight_loader(layer.bias, bias[rows], shard)
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
        if format == quant.INT4:
            reference = quant.dequantize_int4(*quant.quantize_int4(w))
            _assert_matmul_close(layer(x) - bias, x, reference, BF16_BOUND * 1.01)
        else:
            q, scale = quant.quantize_int8(w)
            _assert_int8_close(layer(x) - bias, x, q.float() * scale[:, None])
    with pytest.raises(ValueError, match=r"expected shape \(16, 64\), got \(16, 32\)"):
        layer.weight.weight_loader(layer.weight, torch.zeros(16, 32), "k")


def test_quant_embedding_gathers_and_attends():
    w = _weights(300, 64)
    embedding = QuantEmbedding(300, 64, dtype=torch.float32)
    embedding.weight.weight_loader(embedding.weight, w, None)
    q, scale = quant.quantize_int8(w)
    w_q = q.float() * scale[:, None]
    ids = torch.tensor([[0, 3, 299], [3, 3, 1]])
    assert torch.equal(embedding(ids), w_q[ids])
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(6))
    _assert_int8_close(embedding.attend(x), x, w_q)


@pytest.mark.parametrize("type_name", ["Q5_0", "Q8_0", "Q4_K", "Q6_K"])
def test_gguf_embedding_is_exact(tmp_path, type_name):
    """Kept as stored: a gathered row equals gguf's own dequantization."""
    tensor = _gguf_tensor(tmp_path, type_name, (40, 256))
    embedding = GGUFEmbedding(40, 256, type_name, dtype=torch.float32)
    embedding.weight.weight_loader(embedding.weight, tensor, None)
    ids = torch.tensor([5, 0, 39, 5])
    assert torch.equal(embedding(ids), tensor.read_rows(0, 40)[ids])


@pytest.mark.parametrize("type_name", ["Q8_0", "Q5_0", "Q4_K", "Q6_K", "F16"])
@pytest.mark.parametrize("native", [True, False])
def test_gguf_tensor_rows_are_ggufs_dequantization(tmp_path, type_name, native, monkeypatch):
    """A lazy GGUF tensor's rows, whatever decodes them (the K-quants: the C kernels where they
    run), are gguf's own dequantization of the file's bytes, bit for bit."""
    if native and not kernels.has_gguf_kernel("Q4_K"):
        pytest.skip("no native kernels here")
    if not native:
        monkeypatch.setattr(cpu, "library", lambda: None)
    tensor = _gguf_tensor(tmp_path, type_name, (40, 512))
    raw = tensor.read_raw(0, 40).numpy()
    want = torch.from_numpy(gguf.quants.dequantize(raw, tensor.ggml_type)).view(40, 512)
    assert torch.equal(tensor.read_rows(0, 40), want)
    assert torch.equal(tensor.read_rows(3, 9), want[3:9])


def test_gguf_embedding_maps_the_file(tmp_path):
    """The table is a private map of the file's bytes, not a copy: only the rows a step gathers
    become resident (as llama.cpp's mapped token embedding), and a write stays in the process."""
    tensor = _gguf_tensor(tmp_path, "Q5_0", (40, 256))
    embedding = GGUFEmbedding(40, 256, "Q5_0", dtype=torch.float32)
    embedding.weight.weight_loader(embedding.weight, tensor, None)
    address = embedding.weight.data_ptr()
    mapped_from = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, stop = (int(a, 16) for a in fields[0].split("-"))
        if start <= address < stop and len(fields) == 6:
            mapped_from.add(Path(fields[5]).resolve())
    assert mapped_from == {tensor.path.resolve()}
    assert torch.equal(embedding.weight, tensor.read_raw(0, 40))
    before = tensor.path.read_bytes()
    embedding.weight.data[0, 0] ^= 0xFF  # copy-on-write: this page becomes the process's own
    assert tensor.path.read_bytes() == before


def test_q4_k_into_int4_exactly(tmp_path):
    tensor = _gguf_tensor(tmp_path, "Q4_K", (32, 512))
    assert tensor.stores_int4
    q, scale, low = tensor.read_int4(0, 32)
    w = tensor.read_rows(0, 32)
    # q * scale + min is gguf's dequantization, to the bit.
    assert torch.equal(q.float() * scale.repeat_interleave(32, 1) + low.repeat_interleave(32, 1), w)
    layer = QuantLinear(512, [32], bias=False, dtype=torch.float32, format=quant.INT4)
    layer.weight.weight_loader(layer.weight, tensor, None)
    x = torch.randn(4, 512)
    # Off only by the bfloat16 rounding of scale (2^-9 |q - 8| s) and zero (2^-9 |z|): well inside the bound.
    _assert_matmul_close(layer(x), x, w, 2 * BF16_BOUND)


def _gguf_tensor(tmp_path, type_name: str, shape: tuple[int, int]):
    """A GGUFTensor of `shape` stored as `type_name`, from a one-tensor GGUF file."""
    tensor_type = gguf.GGMLQuantizationType[type_name]
    if tensor_type in RANDOM_BLOCK_TYPES:
        raw = random_blocks(shape, tensor_type, seed=0)
    else:
        raw = gguf.quants.quantize(_weights(*shape).numpy(), tensor_type)
    writer = gguf.GGUFWriter(str(tmp_path / "one.gguf"), "qwen2")
    writer.add_tensor("token_embd.weight", raw, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from qwenkit.loader.gguf import GGUFTensor, _read_header

    _, infos = _read_header(tmp_path / "one.gguf")
    return GGUFTensor(tmp_path / "one.gguf", infos["token_embd.weight"])


# -- whole models ----------------------------------------------------------------------------


def _prompt_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        kv = llm.model.allocate_kv_cache(len(ids))
        meta = AttentionMetadata.contiguous(start=0, num_tokens=len(ids))
        return llm.model.compute_logits(llm.model(torch.tensor(ids), torch.arange(len(ids)), kv, meta))


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(mean, max) of |got - want| / std(want)."""
    error = (got - want).abs() / want.std()
    return error.mean().item(), error.max().item()


def _fake_quantized(path, formats: dict[str, str], *, exact: tuple[str, ...] = ()) -> LLM:
    """The float32 load of `path` with each weight `formats` names replaced by its dequantized
    int8 / int4 value (those ending in `exact` already are): what the quantized model computes."""
    llm = LLM(str(path), dtype="float32", quantization="none", progress=False)
    modules = dict(llm.model.named_modules())
    with torch.no_grad():
        for name, format in formats.items():
            w = getattr(modules[name], "weight", None)
            if isinstance(format, tuple):  # a format per shard: the int8 ones requantized
                for first, size, part_format in zip(modules[name].offsets, modules[name].output_sizes, format):
                    if part_format == quant.INT8:
                        q, scale = quant.quantize_int8(w[first : first + size])
                        w[first : first + size] = q.float() * scale[:, None]
            elif format == quant.INT8:
                q, scale = quant.quantize_int8(w)
                w.copy_(q.float() * scale[:, None])
            elif format == quant.INT4 and not name.endswith(exact):
                w.copy_(quant.dequantize_int4(*quant.quantize_int4(w)))
    return llm


def _check_against_fake_quantized(monkeypatch, llm: LLM, fake: LLM, *, float_path: bool = True) -> None:
    """The kernels differ from the float32 model by rounding activations and outputs to bfloat16 (as
    much as a bfloat16 model does: ~2% of the logits' spread on these chaotic random models); the
    dequantizing path of int8 only by float32 rounding, down to the same greedy tokens."""
    prompt = list(range(3, 40))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    monkeypatch.setattr("qwenkit.kernels.ops.linear.MAX_KERNEL_TOKENS", 1 << 30)
    want = _prompt_logits(fake, prompt)
    assert _relative_error(_prompt_logits(llm, prompt), want)[0] <= 0.05  # the native int8 kernel where built
    monkeypatch.setattr("qwenkit.kernels.ops.linear.MAX_NATIVE_KERNEL_TOKENS", 0)
    assert _relative_error(_prompt_logits(llm, prompt), want)[0] <= 0.05  # torch's kernels
    if float_path:
        monkeypatch.setattr("qwenkit.kernels.ops.linear.MAX_KERNEL_TOKENS", 0)
        assert _relative_error(_prompt_logits(llm, prompt), _prompt_logits(fake, prompt))[1] <= 1e-4
        assert llm.generate(prompt, params)[0].token_ids == fake.generate(prompt, params)[0].token_ids


def _module_formats(model) -> dict[str, str]:
    return {
        name: getattr(m, "format", type(m).__name__)
        for name, m in model.named_modules()
        if name.endswith(("_proj", "embed_tokens", "lm_head", "mlp.gate", "experts"))
    }


@pytest.mark.parametrize("arch,tie", [("qwen2", False), ("qwen3", True), ("qwen3_moe", False)])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_safetensors_quantized_load(tmp_path, monkeypatch, arch, tie, quantization):
    make_checkpoint(tmp_path, arch, tie=tie)
    llm = LLM(str(tmp_path), dtype="float32", quantization=quantization, progress=False)
    formats = _module_formats(llm.model)
    assert formats["model.layers.0.self_attn.qkv_proj"] == quantization
    assert formats["model.layers.0.self_attn.o_proj"] == quantization
    assert formats["model.embed_tokens"] == "int8"  # the tied lm_head too: compute_logits uses it
    assert formats.get("lm_head", "int8") == "int8"
    if arch == "qwen3_moe":
        assert formats["model.layers.0.mlp.gate"] == "Linear"  # the router stays float
        assert formats["model.layers.0.mlp.experts"] == "FusedExperts"
        assert formats["model.layers.1.mlp.gate_up_proj"] == quantization  # mlp_only_layers=[1]
    fake = _fake_quantized(tmp_path, formats)
    _check_against_fake_quantized(monkeypatch, llm, fake, float_path=quantization == "int8")


@pytest.mark.parametrize("tie", [False, True])
def test_quantized_lm_head_of_a_16_bit_model_gives_float32_logits(tmp_path, tie):
    """A bfloat16 model's int8 lm_head (or tied embedding) takes the hidden states in float32 and
    its logits are not rounded to bfloat16 on the way: they equal the kernel's float32 product."""
    make_checkpoint(tmp_path, "qwen3", tie=tie)
    model = LLM(str(tmp_path), dtype="bfloat16", quantization="int8", progress=False).model
    head = model.model.embed_tokens if tie else model.lm_head
    hidden = torch.randn(3, model.config.hidden_size).to(torch.bfloat16)
    logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, kernels.int8_linear(hidden.float(), head.weight, head.scale))
    assert not torch.equal(logits, logits.to(torch.bfloat16).float())


def _tiny_gguf_model():
    """A Qwen2 with rows of 256 values: Q4_K and Q6_K need whole 256-value super-blocks."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
        intermediate_size=512, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 and "norm" in name else 0.1 * torch.randn_like(p))
    return model


# What llama.cpp's Q4_K_M mixes, one type per kind of matrix.
MIXED_TYPES = {"token_embd": "Q5_0", "output": "Q8_0", "attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": "Q8_0",
               "attn_output": "Q5_0", "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"}


def _mixed_type(gguf_name: str) -> str:
    key = gguf_name.removesuffix(".weight").rpartition(".")[2] if gguf_name.startswith("blk.") else gguf_name.split(".")[0]
    return MIXED_TYPES.get(key, "F32")


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    return write_gguf(path, _tiny_gguf_model(), "qwen2", weight_type=_mixed_type)


@pytest.mark.parametrize("native", [True, False], ids=["native-kernels", "torch-only"])
@pytest.mark.parametrize("isa", ["avx2", "avx512_vnni"])
def test_gguf_auto_keeps_weights_quantized(monkeypatch, mixed_gguf, native, isa):
    """quantization="auto": Q5_0 as stored where the native kernel runs; the K-quants as stored
    where the kernels' variant is one measured for it (avx2), else int8, as is every type without
    a kernel here (`isa`: the variant the plan takes this CPU to run; the kernels run are this
    CPU's own)."""
    if native and cpu.library() is None:
        pytest.skip("no C compiler: the native kernels are not built")
    if not native:  # as on a machine without a C compiler
        monkeypatch.setattr(cpu, "library", lambda: None)
    monkeypatch.setattr(cpu, "selected_isa", lambda: isa)
    llm = LLM(str(mixed_gguf), dtype="float32", progress=False)  # quantization="auto"
    formats = _module_formats(llm.model)
    k_quants_stored = native and isa in K_QUANTS_STORED_ISAS
    assert formats["model.embed_tokens"] == "gguf:Q5_0"  # untied: kept as stored
    assert formats["lm_head"] == "int8"
    # Q5_0 + Q5_0 + Q8_0: a format per part where the Q5_0 kernel runs.
    assert formats["model.layers.1.self_attn.qkv_proj"] == (("gguf:Q5_0", "gguf:Q5_0", "int8") if native else "int8")
    assert formats["model.layers.1.mlp.gate_up_proj"] == ("gguf:Q4_K" if k_quants_stored else "int8")
    assert formats["model.layers.1.mlp.down_proj"] == ("gguf:Q6_K" if k_quants_stored else "int8")
    # All Q5_0: kept as stored where the native kernel runs.
    assert formats["model.layers.1.self_attn.o_proj"] == ("gguf:Q5_0" if native else "int8")
    _check_against_fake_quantized(monkeypatch, llm, _fake_quantized(mixed_gguf, formats))

    # Each int8 matrix is the int8 quantization of the file's dequantized values; a K-quant one
    # as stored holds the file's bytes.
    from qwenkit.loader.gguf import GGUFTensor, _read_header

    _, infos = _read_header(mixed_gguf)
    stored = dict(GGUFCheckpoint(mixed_gguf).iter_weights())
    down = llm.model.model.layers[0].mlp.down_proj
    if k_quants_stored:
        assert torch.equal(down.weight, GGUFTensor(mixed_gguf, infos["blk.0.ffn_down.weight"]).read_raw(0, 256))
    else:
        q, scale = quant.quantize_int8(stored["model.layers.0.mlp.down_proj.weight"])
        assert torch.equal(down.weight, q) and torch.equal(down.scale.float(), scale)
    if native:  # and a Q5_0 matrix holds the file's bytes, interleaved for the kernels
        o_proj = llm.model.model.layers[0].self_attn.o_proj
        raw = GGUFTensor(mixed_gguf, infos["blk.0.attn_output.weight"]).read_raw(0, 256)
        assert torch.equal(o_proj.weight, kernels.gguf_pack(raw, 256, "Q5_0")) and not torch.equal(o_proj.weight, raw)
    qkv = llm.model.model.layers[0].self_attn.qkv_proj
    v_rows = qkv.parts[2].weight if native else qkv.weight[256 + 128 :]
    assert torch.equal(v_rows, quant.quantize_int8(stored["model.layers.0.self_attn.v_proj.weight"])[0])
    if native:  # and the Q5_0 parts hold the file's bytes
        raw = GGUFTensor(mixed_gguf, infos["blk.0.attn_q.weight"]).read_raw(0, 256)
        assert torch.equal(qkv.parts[0].weight, kernels.gguf_pack(raw, 256, "Q5_0"))


@needs_native
def test_gguf_quantization_keeps_k_quants_as_stored(monkeypatch, mixed_gguf):
    """--quantization gguf: the K-quant matrices too stay in the file's blocks whatever the
    kernels' variant (the smallest in memory: smaller than "auto" where that requantizes them),
    computing the file's values (fake-quantized: nothing requantized there)."""
    from qwenkit.loader.gguf import GGUFTensor, _read_header

    monkeypatch.setattr(cpu, "selected_isa", lambda: "amx")  # "auto" makes the K-quants int8
    llm = LLM(str(mixed_gguf), dtype="float32", quantization="gguf", progress=False)
    formats = _module_formats(llm.model)
    assert formats["model.layers.1.mlp.gate_up_proj"] == "gguf:Q4_K"
    assert formats["model.layers.1.mlp.down_proj"] == "gguf:Q6_K"
    assert formats["model.layers.1.self_attn.o_proj"] == "gguf:Q5_0"
    assert formats["model.layers.1.self_attn.qkv_proj"] == ("gguf:Q5_0", "gguf:Q5_0", "int8")  # Q8_0: int8
    _, infos = _read_header(mixed_gguf)
    down = llm.model.model.layers[0].mlp.down_proj
    assert torch.equal(down.weight, GGUFTensor(mixed_gguf, infos["blk.0.ffn_down.weight"]).read_raw(0, 256))
    _check_against_fake_quantized(monkeypatch, llm, _fake_quantized(mixed_gguf, formats))
    auto = sum(p.numel() * p.element_size() for p in LLM(str(mixed_gguf), dtype="float32", progress=False).model.parameters())
    assert sum(p.numel() * p.element_size() for p in llm.model.parameters()) < auto


def test_gguf_quantization_needs_a_gguf_checkpoint(tmp_path):
    make_checkpoint(tmp_path, "qwen3")
    with pytest.raises(ModelLoadError, match="quantization 'gguf' keeps GGUF blocks as stored: it needs a .gguf"):
        LLM(str(tmp_path), dtype="float32", quantization="gguf", progress=False)


def test_gguf_int4_takes_q4_k_exactly(monkeypatch, mixed_gguf):
    llm = LLM(str(mixed_gguf), dtype="float32", quantization="int4", progress=False)
    formats = _module_formats(llm.model)
    assert formats["model.layers.0.mlp.gate_up_proj"] == "int4"
    assert formats["lm_head"] == formats["model.embed_tokens"] == "int8"
    gate_up = llm.model.model.layers[0].mlp.gate_up_proj
    stored = dict(GGUFCheckpoint(mixed_gguf).iter_weights())
    w = torch.cat([stored["model.layers.0.mlp.gate_proj.weight"], stored["model.layers.0.mlp.up_proj.weight"]])
    x = torch.randn(2, 256)
    _assert_matmul_close(gate_up(x), x, w, 2 * BF16_BOUND)  # the Q4_K values themselves
    fake = _fake_quantized(mixed_gguf, formats, exact=("gate_up_proj",))  # Q4_K; the rest requantized
    _check_against_fake_quantized(monkeypatch, llm, fake, float_path=False)


def test_safetensors_tensor_reads_rows_without_the_memory_map(tmp_path):
    """Lazy safetensors tensors read rows with file reads; the values are safetensors' own."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qwenkit.loader.safetensors import iter_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, 5, generator=g).to(torch.bfloat16), "b": torch.randn(9, generator=g).half(),
               "c": torch.randn(3, 2, 4, generator=g)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    lazy = dict(iter_safetensors(tmp_path, torch.float32, lazy=True))
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        for name in tensors:
            want = f.get_tensor(name).float()
            assert lazy[name].shape == tuple(want.shape)
            assert torch.equal(lazy[name].read_rows(0, want.shape[0]), want)
            assert torch.equal(lazy[name].read_rows(1, 3), want[1:3])
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])  # cut inside the last tensor's data
    last = max(tensors, key=lambda n: lazy[n]._offset)
    with pytest.raises(ModelLoadError, match="file ends inside a tensor"):
        lazy[last].read_rows(0, lazy[last].shape[0])


def test_quantized_load_reports_missing_tensors(tmp_path):
    make_checkpoint(tmp_path, "qwen2")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing tensors for: model\.layers\.1\.self_attn\.qkv_proj\.weight"):
        load_model(resolve_model(str(tmp_path), progress=False), dtype=torch.float32,
                   device=torch.device("cpu"), quantization="int8", progress=False)


def test_bad_quantization_choice(tmp_path):
    make_checkpoint(tmp_path, "qwen3")
    with pytest.raises(QwenkitError, match="unknown quantization 'int3'; choose one of auto, gguf, none, int8, int4"):
        LLM(str(tmp_path), quantization="int3", progress=False)
    model = load_model(resolve_model(str(tmp_path), progress=False), dtype=torch.float32, device=torch.device("cpu"),
                       quantization="none", progress=False).model
    with pytest.raises(ModelLoadError, match="'int4' runs on CPU only"):
        plan_quantization(model, "int4", tensor_types=None, device=torch.device("cuda"))
    # On CUDA, "auto" loads GGUF as floats and "int8" dequantizes each call.
    assert plan_quantization(model, "auto", tensor_types={"model.norm.weight": gguf.GGMLQuantizationType.Q8_0},
                             device=torch.device("cuda")) == {}


@needs_native
def test_fused_matrix_of_mixed_types_takes_a_format_per_part(tmp_path):
    """q/k/v stored in different types: a format per part where each part's kernel runs here,
    else int8 for the whole (a part stored as floats, or rows a K-quant's super-blocks do not fit)."""
    make_checkpoint(tmp_path, "qwen3")  # hidden size 64: Q5_0's blocks of 32 fit, Q4_K's 256 do not
    model = load_model(resolve_model(str(tmp_path), progress=False), dtype=torch.float32, device=torch.device("cpu"),
                       quantization="none", progress=False).model
    T = gguf.GGMLQuantizationType

    def qkv_format(q, k, v):
        types = {f"model.layers.0.self_attn.{name}_proj.weight": t for name, t in zip("qkv", (q, k, v))}
        return plan_quantization(model, "gguf", tensor_types=types, device=torch.device("cpu"))[
            "model.layers.0.self_attn.qkv_proj"]

    assert qkv_format(T.Q5_0, T.Q5_0, T.Q8_0) == ("gguf:Q5_0", "gguf:Q5_0", "int8")
    assert qkv_format(T.Q5_0, T.Q5_0, T.Q5_0) == "gguf:Q5_0"
    assert qkv_format(T.Q5_0, T.Q5_0, T.F16) == "int8"
    assert qkv_format(T.Q5_0, T.Q5_0, T.Q4_K) == "int8"
    assert qkv_format(T.Q4_K, T.Q4_K, T.Q4_K) == "int8"
