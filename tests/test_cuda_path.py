"""The CUDA path, proven on the CPU: the Triton kernels under Triton's interpreter drive
whole engine runs (prefill reading the paged cache in place, fused norms, rotary and cache
writes, decode attention), and the CUDA-graph runner's buffers and batch buckets run
eagerly. Both must give what the torch path gives on the same weights."""

import pytest
import torch
from tiny import ARCHS, make_checkpoint

from qwenkit import LLM, SamplingParams
from qwenkit.engine.cuda_graph import CUDAGraphDecode
from qwenkit.engine.decode_batch import batch_buckets
from qwenkit.engine.scheduler import ScheduledSequence
from qwenkit.kernels import cuda as cuda_kernels

pytest.importorskip("triton", reason="Triton is not installed (the `test` extra has it)")

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True)


@pytest.fixture(scope="module", params=ARCHS)
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_checkpoint(path, request.param)
    return str(path)


def prompts() -> list[list[int]]:
    shared = list(range(10, 42))  # two full blocks: the second prompt hits the prefix cache
    return [shared + [5, 6, 7], shared + [8], [50 + i for i in range(21)]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter stands in for a GPU; test_gpu.py runs there")
def test_triton_kernels_match_the_torch_path(folder, monkeypatch):
    # The Triton path keeps the model's dtype in the cache; the torch path's default (float16
    # on a float32 CPU) would differ from it by the cache's rounding.
    reference = LLM(folder, dtype="float32", kv_cache_dtype="float32", progress=False)
    expected = [reference.generate(p, PARAMS)[0] for p in prompts()]
    monkeypatch.setattr(cuda_kernels, "RUN_ON_CPU", True)
    llm = LLM(folder, dtype="float32", progress=False)
    assert llm.engine.runner.paged_prefill
    outs = llm.generate(prompts()[:1], PARAMS) + llm.generate(prompts()[1:], PARAMS)  # then a batch of two
    assert outs[1].num_cached_tokens == 32
    for out, ref in zip(outs, expected):
        assert out.token_ids == ref.token_ids
        got = [t.logprob for t in out.outputs[0].logprobs]
        want = [t.logprob for t in ref.outputs[0].logprobs]
        assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter stands in for a GPU; test_gpu.py runs there")
def test_a_cache_of_another_dtype_runs_the_torch_attention(folder, monkeypatch):
    """The Triton kernels take the cache in the activations' dtype; a cache asked in another
    (`kv_cache_dtype`) runs the torch code instead, and gives what the CPU path gives."""
    reference = LLM(folder, dtype="float32", kv_cache_dtype="float16", progress=False)
    expected = reference.generate(prompts(), PARAMS)
    monkeypatch.setattr(cuda_kernels, "RUN_ON_CPU", True)
    llm = LLM(folder, dtype="float32", kv_cache_dtype="float16", progress=False)
    assert llm.engine.runner.kv_caches[0][0].dtype == torch.float16
    outs = llm.generate(prompts(), PARAMS)
    for out, ref in zip(outs, expected):
        assert out.token_ids == ref.token_ids
        got = [t.logprob for t in out.outputs[0].logprobs]
        want = [t.logprob for t in ref.outputs[0].logprobs]
        assert got == pytest.approx(want, abs=1e-3)


def test_batch_buckets():
    """One table for the compiled steps and the CUDA graphs."""
    assert batch_buckets(1) == (1,)
    assert batch_buckets(40) == (1, 2, 4, 8, 16, 32, 40)
    assert batch_buckets(256) == (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


def test_graph_buffers_pad_to_buckets_and_match_the_eager_step(folder):
    # A float32 cache: the graph step's 4-row matmuls may round differently from the eager
    # step's 3 rows, and a 16-bit cache could turn that into a one-ulp different key.
    llm = LLM(folder, dtype="float32", kv_cache_dtype="float32", progress=False, max_num_seqs=8)
    engine = llm.engine
    for i, p in enumerate(prompts()):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()  # the three prompts
    engine.step()  # a decode step of three: now each has a token to compute
    batch = [ScheduledSequence(seq, 1) for seq in engine.scheduler.running]
    runner = engine.runner
    rows, eager = runner.run(batch)
    graphs = CUDAGraphDecode(
        llm.model, runner.kv_caches, max_num_seqs=8, max_blocks_per_seq=8, block_size=runner.block_size,
        padding_slot=runner.kv_caches[0][0].shape[0] - 1, device=torch.device("cpu"), capture=False,
    )
    assert graphs.buckets == (1, 2, 4, 8)
    seqs = [s.seq for s in batch]
    positions = [seq.num_computed_tokens for seq in seqs]
    # Stale rows from a bigger step must not leak into a smaller one.
    graphs([seqs[0].token_ids[-1]] * 7, [positions[0]] * 7, [seqs[0].block_table] * 7)
    logits = graphs([seq.token_ids[p] for seq, p in zip(seqs, positions)], positions,
                    [seq.block_table for seq in seqs])
    assert logits.shape[0] == 3 and rows == [0, 1, 2]
    torch.testing.assert_close(logits, eager, atol=1e-5, rtol=1e-5)
