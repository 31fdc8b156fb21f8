"""Engine invariants on a tiny model: batching, prefix caching, chunked prefill and
preemption never change a request's output; aborts give every block back."""

import threading

import pytest

from qwenkit import LLM, SamplingParams
from qwenkit.engine import block_manager as bm_module
from qwenkit.engine.block_manager import BlockManager
from qwenkit.engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tiny_checkpoints):
    return str(tiny_checkpoints("qwen3"))


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(folder, dtype="float32", progress=False)


def prompts(n: int) -> list[list[int]]:
    """n prompts of different lengths (5..61 tokens) sharing nothing but chance."""
    return [[(7 * i + 3 * j) % 300 + 5 for j in range(5 + 8 * i)] for i in range(n)]


def alone(llm, ps, params=GREEDY):
    return [llm.generate(p, params)[0].token_ids for p in ps]


def test_batched_equals_single(llm):
    ps = prompts(8)
    batched = [o.token_ids for o in llm.generate(ps, GREEDY)]
    assert batched == alone(llm, ps)


def test_seeded_sampling_is_reproducible(llm, folder):
    """Run to run always; whatever else is in the batch with deterministic=True (more in
    tests/test_determinism.py: without it, near-ties of top_p can flip a sampled token)."""
    ps = prompts(6)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=10, ignore_eos=True)
              for i in range(6)]
    batched = [o.token_ids for o in llm.generate(ps, params)]
    assert batched == [o.token_ids for o in llm.generate(ps, params)]
    deterministic = LLM(folder, dtype="float32", progress=False, deterministic=True)
    batched = [o.token_ids for o in deterministic.generate(ps, params)]
    assert batched == [deterministic.generate(p, q)[0].token_ids for p, q in zip(ps, params)]


def test_prefix_cache_hit_equals_miss(folder):
    shared = list(range(10, 74))  # 64 tokens: four full blocks of 16
    cached = LLM(folder, dtype="float32", progress=False)
    uncached = LLM(folder, dtype="float32", progress=False, enable_prefix_caching=False)
    first = cached.generate(shared + [5, 6], GREEDY)[0]
    assert first.num_cached_tokens == 0
    second = cached.generate(shared + [7, 8, 9], GREEDY)[0]
    assert second.num_cached_tokens == 64
    assert second.token_ids == uncached.generate(shared + [7, 8, 9], GREEDY)[0].token_ids
    # The whole prompt cached: one token is still computed, to have logits.
    again = cached.generate(shared, GREEDY)[0]
    assert again.num_cached_tokens == 48
    assert again.token_ids == uncached.generate(shared, GREEDY)[0].token_ids


@pytest.mark.parametrize("kv_cache_dtype", ["float16", "bfloat16"])
def test_prefix_cache_hit_equals_miss_with_a_16_bit_cache(folder, kv_cache_dtype):
    """With a 16-bit cache, a prompt's own keys are rounded as the cache holds them before it
    attends to them: a hit (the prefix read back from the cache) and a miss (all keys computed in
    the step) give the same logprobs up to float32 summation order, not the cache's rounding
    (without it: 4e-4 in float16, 4e-3 in bfloat16)."""
    shared = list(range(10, 74))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=True, top_logprobs=5)
    cached = LLM(folder, dtype="float32", progress=False, kv_cache_dtype=kv_cache_dtype)
    uncached = LLM(folder, dtype="float32", progress=False, kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False)
    cached.generate(shared + [5, 6], params)
    hit = cached.generate(shared + [7, 8, 9], params)[0]
    miss = uncached.generate(shared + [7, 8, 9], params)[0]
    assert hit.num_cached_tokens == 64 and hit.token_ids == miss.token_ids
    for a, b in zip(hit.outputs[0].logprobs, miss.outputs[0].logprobs):
        assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a.top_logprobs, b.top_logprobs)) < 2e-5


def test_kv_cache_dtype_choice(folder):
    """auto: float16 on a CPU computing in float32 (twice the tokens in the same memory), else
    the model's dtype; a name it does not know is refused, naming the choices."""
    import torch

    from qwenkit.errors import QwenkitError

    memory = 1 << 20
    half = LLM(folder, dtype="float32", progress=False, kv_cache_memory=memory)
    full = LLM(folder, dtype="float32", progress=False, kv_cache_memory=memory, kv_cache_dtype="float32")
    assert half.engine.runner.kv_caches[0][0].dtype == torch.float16
    assert full.engine.runner.kv_caches[0][0].dtype == torch.float32
    assert abs(half.engine.num_kv_tokens - 2 * full.engine.num_kv_tokens) <= 16  # whole blocks of 16
    bf16 = LLM(folder, dtype="bfloat16", progress=False, kv_cache_memory=memory)
    assert bf16.engine.runner.kv_caches[0][0].dtype == torch.bfloat16
    with pytest.raises(QwenkitError, match="unknown kv_cache_dtype 'int8'; choose one of auto, float32, float16"):
        LLM(folder, dtype="float32", progress=False, kv_cache_dtype="int8")


def test_kv_cache_dtype_on_cuda_stays_the_models_unless_asked():
    """The 16-bit default is the CPU's (its C attention kernel widens the rows); CUDA keeps the
    model's dtype, as the Triton kernels read it."""
    import torch

    from qwenkit.engine.model_runner import resolve_kv_cache_dtype

    cuda = torch.device("cuda")
    assert resolve_kv_cache_dtype("auto", torch.float32, cuda) == torch.float32
    assert resolve_kv_cache_dtype(None, torch.bfloat16, cuda) == torch.bfloat16
    assert resolve_kv_cache_dtype("float16", torch.bfloat16, cuda) == torch.float16


def test_chunked_prefill_equals_whole(folder, llm):
    chunked = LLM(folder, dtype="float32", progress=False, max_num_batched_tokens=8)
    ps = prompts(5)
    assert [o.token_ids for o in chunked.generate(ps, GREEDY)] == alone(llm, ps)


def test_prompt_chunk_of_one_token_beside_decodes(folder, llm):
    """A budget of 3 with two sequences decoding leaves one token for a prompt: a step of
    one-token rows where one row does not sample (it crashed the decode path once)."""
    tight = LLM(folder, dtype="float32", progress=False, max_num_batched_tokens=3)
    ps = [[5, 6], [7, 8], prompts(3)[2]]
    assert [o.token_ids for o in tight.generate(ps, GREEDY)] == alone(llm, ps)


def test_preemption_keeps_outputs(folder, llm):
    # 8 blocks of 4 slots: far too few for 6 concurrent requests of up to ~60 tokens.
    small = LLM(folder, dtype="float32", progress=False, block_size=4,
                kv_cache_memory=8 * 4 * small_bytes_per_token(llm))
    ps = [p[:18] for p in prompts(6)]
    outs = small.generate(ps, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == alone(llm, ps)
    assert small.engine.block_manager.num_free_blocks == small.engine.block_manager.num_blocks


def small_bytes_per_token(llm) -> int:
    from qwenkit.engine.model_runner import kv_bytes_per_token

    return kv_bytes_per_token(llm.model, llm.engine.runner.kv_dtype)


def test_aborts_free_every_block(llm):
    engine = llm.engine
    total = engine.block_manager.num_blocks
    for i, p in enumerate(prompts(4)):
        engine.add_request(f"abort-{i}", p, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < total
    for i in range(4):
        assert engine.abort(f"abort-{i}")
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == total
    assert not engine.abort("abort-0")


def test_n_completions(llm):
    out = llm.generate(prompts(1)[0], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True))[0]
    assert len(out.outputs) == 3
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_request_larger_than_the_pool_is_rejected(folder, llm):
    small = LLM(folder, dtype="float32", progress=False, block_size=4,
                kv_cache_memory=8 * 4 * small_bytes_per_token(llm))
    with pytest.raises(ValueError, match="needs 70 tokens of KV cache but the pool holds 32"):
        small.generate([5] * 30, SamplingParams(max_tokens=40))


def test_prefix_hash_collision_is_caught(monkeypatch):
    """Two different blocks with the same hash: the token check refuses the wrong one."""
    monkeypatch.setattr(bm_module, "chain_hash", lambda prefix, tokens: 42)
    bm = BlockManager(8, 4)
    a = Sequence("a", 0, [1, 2, 3, 4, 5], 5, 10)
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.commit_full_blocks(a)
    b = Sequence("b", 0, [9, 9, 9, 9, 5], 5, 10)
    bm.match_prefix(b)
    assert b.num_computed_tokens == 0 and b.block_table == []


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(4, 2)
    a = Sequence("a", 0, [1, 2, 3, 4, 5], 5, 10)
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.commit_full_blocks(a)
    bm.free_sequence(a)
    assert bm.num_free_blocks == 4
    b = Sequence("b", 0, [1, 2, 3, 4, 6], 5, 10)
    bm.match_prefix(b)
    assert b.num_computed_tokens == 4 and b.block_table == a_blocks(bm, [1, 2, 3, 4])
    assert bm.num_free_blocks == 2


def a_blocks(bm, tokens):
    return [bm.cached[h] for h in _hashes(tokens, bm.block_size)]


def _hashes(tokens, size):
    out, prefix = [], None
    for i in range(0, len(tokens), size):
        prefix = bm_module.chain_hash(prefix, tuple(tokens[i : i + size]))
        out.append(prefix)
    return out


def test_a_second_thread_stepping_the_engine_is_refused(llm, monkeypatch):
    """One thread drives an engine: a step entered while another runs raises, instead of taking
    tokens of the other thread's requests (what calling an AsyncLLM's .llm beside its thread did)."""
    engine = llm.engine
    entered, release = threading.Event(), threading.Event()
    run = engine.runner.run

    def slow_run(batch, **kwargs):
        entered.set()
        release.wait(30)
        return run(batch, **kwargs)

    monkeypatch.setattr(engine.runner, "run", slow_run)
    engine.add_request("two-threads", [5, 6, 7], SamplingParams(max_tokens=1))
    first = threading.Thread(target=engine.step)
    first.start()
    try:
        assert entered.wait(30)
        with pytest.raises(RuntimeError, match="another thread is stepping this engine"):
            engine.step()
    finally:
        release.set()
        first.join()
    monkeypatch.undo()
    while engine.has_unfinished_requests():
        engine.step()
