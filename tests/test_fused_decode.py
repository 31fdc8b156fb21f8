"""The fused CPU decode step (qwenkit/models/fused_decode.py, kernels.DecodeLayers) against the torch-module decode
step on the same weights, cache and batch: hidden states, the keys and values it writes, and
when it applies.

Both paths quantize every matmul's activations to int8 in blocks of 32, so a last-bit
difference in an activation (the fused SiLU, a norm's summation order) can flip one rounding
and move that product by one quantization step; the bounds below allow for that and nothing
more (a wrong head, bias or norm is off by the activations' own size).
"""

from __future__ import annotations

import pytest
import torch
from test_gguf import write_gguf
from test_quant import _mixed_type, _tiny_gguf_model
from tiny import make_checkpoint

from qwenkit import LLM, SamplingParams
from qwenkit.kernels import cpu

needs_kernels = pytest.mark.skipif(cpu.library() is None, reason="no C compiler: the kernels are not built")

# Lengths that end inside a block, exactly on a block edge (16) and past it.
PROMPT_LENGTHS = (5, 16, 37)


def _decode_inputs(runner, ids, positions, tables):
    """A decode step's token ids, positions and metadata, as the runner builds them (unpadded)."""
    batch = runner.decode_batch(ids, positions, tables)
    return batch.input_ids, batch.positions, batch.metadata()


def _decoding(llm: LLM, lengths=PROMPT_LENGTHS) -> list:
    """Prefill prompts of `lengths` tokens and decode a few tokens: the running sequences."""
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    for i, n in enumerate(lengths):
        llm.engine.add_request(f"r{i}", [(7 * i + 3 * j) % 200 + 5 for j in range(n)], params)
    for _ in range(len(lengths) + 3):
        llm.engine.step()
    seqs = list(llm.engine.scheduler.running)
    assert len(seqs) == len(lengths) and all(len(s.token_ids) - s.num_computed_tokens == 1 for s in seqs)
    return seqs


def _compare_step(llm: LLM) -> None:
    runner = llm.engine.runner
    assert runner.fused is not None
    seqs = _decoding(llm)
    ids = [s.token_ids[s.num_computed_tokens] for s in seqs]
    positions = [s.num_computed_tokens for s in seqs]
    tables = [list(s.block_table) for s in seqs]
    bs = runner.block_size
    slots = torch.tensor([t[p // bs] * bs + p % bs for t, p in zip(tables, positions)])
    with torch.inference_mode():
        fused = runner.fused(*_decode_inputs(runner, ids, positions, tables))
        fused_kv = [(k[slots].clone(), v[slots].clone()) for k, v in runner.kv_caches]
        step_ids, step_positions, meta = _decode_inputs(runner, ids, positions, tables)
        eager = runner.model(step_ids, step_positions, runner.kv_caches, meta)
        eager_kv = [(k[slots].clone(), v[slots].clone()) for k, v in runner.kv_caches]
    spread = eager.std().item()
    error = (fused - eager).abs() / spread
    assert error.mean().item() < 2e-3 and error.max().item() < 3e-2, (error.mean().item(), error.max().item())
    for (fk, fv), (ek, ev) in zip(fused_kv, eager_kv):
        torch.testing.assert_close(fk, ek, atol=3e-2 * ek.std().item(), rtol=0)
        torch.testing.assert_close(fv, ev, atol=3e-2 * ev.std().item(), rtol=0)


@needs_kernels
@pytest.mark.parametrize("kv_cache_dtype", ["float32", "float16"])  # float16: the CPU default
@pytest.mark.parametrize("arch,tie", [("qwen2", False), ("qwen3", True)])  # qkv bias; QK-norm
def test_fused_step_equals_module_step_int8(tmp_path, arch, tie, kv_cache_dtype):
    make_checkpoint(tmp_path, arch, tie=tie)
    llm = LLM(str(tmp_path), dtype="float32", quantization="int8", kv_cache_dtype=kv_cache_dtype, progress=False)
    assert llm.engine.runner.kv_caches[0][0].dtype == getattr(torch, kv_cache_dtype)
    _compare_step(llm)


@needs_kernels
@pytest.mark.parametrize("arch,tie", [("qwen2", False), ("qwen3", True)])
def test_fused_step_of_a_bfloat16_model(tmp_path, arch, tie):
    """A bfloat16 model (the default on AVX512-BF16 / AMX CPUs) decodes through the fused step,
    in float32 over its bfloat16 cache. Against the float32 module path on the same weights and
    cache, it is no further off than the bfloat16 module path is (which rounds to bfloat16
    between operations; on these chaotic random models that is ~2% of the spread)."""
    make_checkpoint(tmp_path, arch, tie=tie)
    half = LLM(str(tmp_path), dtype="bfloat16", quantization="int8", progress=False)
    full = LLM(str(tmp_path), dtype="float32", quantization="int8", kv_cache_dtype="bfloat16", progress=False)
    runner, reference = half.engine.runner, full.engine.runner
    assert runner.fused is not None and runner.kv_dtype == torch.bfloat16
    seqs = _decoding(half)
    step = ([s.token_ids[s.num_computed_tokens] for s in seqs], [s.num_computed_tokens for s in seqs],
            [list(s.block_table) for s in seqs])
    with torch.inference_mode():
        halves = dict(half.model.named_parameters())
        for name, p in full.model.named_parameters():
            if p.is_floating_point():
                p.copy_(halves[name].float())
        for (k, v), (rk, rv) in zip(runner.kv_caches, reference.kv_caches):
            rk.copy_(k)
            rv.copy_(v)
        ids, positions, meta = _decode_inputs(reference, *step)
        want = full.model(ids, positions, reference.kv_caches, meta)
        fused = runner.fused(*_decode_inputs(runner, *step)).float()
        ids, positions, meta = _decode_inputs(runner, *step)
        module = runner.model(ids, positions, runner.kv_caches, meta).float()
    fused_error = ((fused - want).abs() / want.std()).mean().item()
    module_error = ((module - want).abs() / want.std()).mean().item()
    assert fused_error < 0.05 and fused_error <= 1.2 * module_error, (fused_error, module_error)


@needs_kernels
def test_fused_step_equals_module_step_gguf_q5_0(tmp_path):
    """The Q4_K_M mix: Q5_0, Q4_K and Q6_K projections kept as stored next to int8 ones, and
    q/k/v in Q5_0, Q5_0 and int8 (each part in its own format, the bias over the whole)."""
    path = write_gguf(tmp_path / "mixed.gguf", _tiny_gguf_model(), "qwen2", weight_type=_mixed_type)
    llm = LLM(str(path), dtype="float32", quantization="gguf", progress=False)
    attn, mlp = llm.model.model.layers[0].self_attn, llm.model.model.layers[0].mlp
    assert attn.o_proj.format == "gguf:Q5_0"
    assert attn.qkv_proj.format == ("gguf:Q5_0", "gguf:Q5_0", "int8") and attn.qkv_proj.bias is not None
    assert (mlp.gate_up_proj.format, mlp.down_proj.format) == ("gguf:Q4_K", "gguf:Q6_K")
    _compare_step(llm)


@needs_kernels
def test_fused_step_rows_do_not_depend_on_the_batch(tmp_path):
    """Each sequence's row of a batched fused step is bit for bit that of the sequence alone."""
    path = write_gguf(tmp_path / "mixed.gguf", _tiny_gguf_model(), "qwen2", weight_type=_mixed_type)
    llm = LLM(str(path), dtype="float32", progress=False)  # Q5_0 and int8 projections
    runner = llm.engine.runner
    seqs = _decoding(llm, lengths=[5 + 4 * i for i in range(11)])  # a group of 8 rows and a tail of 3
    ids = [s.token_ids[s.num_computed_tokens] for s in seqs]
    positions = [s.num_computed_tokens for s in seqs]
    tables = [list(s.block_table) for s in seqs]
    with torch.inference_mode():
        batched = runner.fused(*_decode_inputs(runner, ids, positions, tables))
        for i in range(len(seqs)):
            alone = runner.fused(*_decode_inputs(runner, ids[i : i + 1], positions[i : i + 1], tables[i : i + 1]))
            assert torch.equal(alone[0], batched[i])


@needs_kernels
def test_fused_decode_applies_only_where_every_matmul_has_a_kernel(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "dense", "qwen3")
    make_checkpoint(tmp_path / "moe", "qwen3_moe")
    kwargs = dict(dtype="float32", progress=False)
    assert LLM(str(tmp_path / "dense"), quantization="int8", **kwargs).engine.runner.fused is not None
    assert LLM(str(tmp_path / "dense"), quantization="none", **kwargs).engine.runner.fused is None  # float weights
    assert LLM(str(tmp_path / "dense"), quantization="int4", **kwargs).engine.runner.fused is None  # torch's kernel
    assert LLM(str(tmp_path / "moe"), quantization="int8", **kwargs).engine.runner.fused is None  # experts
    bf16 = LLM(str(tmp_path / "dense"), dtype="bfloat16", quantization="int8", progress=False)
    assert bf16.engine.runner.fused is not None  # computes in float32 over the bfloat16 cache
    monkeypatch.setattr(cpu, "library", lambda: None)  # no compiler, or QWENKIT_NATIVE_KERNELS=0
    assert LLM(str(tmp_path / "dense"), quantization="int8", **kwargs).engine.runner.fused is None


@needs_kernels
def test_fused_engine_generates_like_the_module_path(tmp_path):
    """End to end through the engine, sequences joining and leaving the batch."""
    make_checkpoint(tmp_path, "qwen2")
    llm = LLM(str(tmp_path), dtype="float32", quantization="int8", progress=False)
    prompts = [[(5 * i + 3 * j) % 200 + 5 for j in range(4 + 9 * i)] for i in range(3)]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 4, 20)]
    fused = [o.token_ids for o in llm.generate(prompts, params)]
    llm.engine.runner.fused = None
    assert [o.token_ids for o in llm.generate(prompts, params)] == fused
