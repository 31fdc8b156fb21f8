"""`deterministic=True` (`--deterministic`): a request's tokens are the same alone, in any batch,
with its prompt chunked or not, with or without a prefix-cache hit (issue #17, item 12).

Compared are the tokens, sampled at temperature 1 with top_p, and each token's logprob, to
the bit: without the switch the same runs differ in the logprobs
(`test_without_the_switch_batches_change_numbers`), so these tests can fail."""

import random

import pytest
import torch

from qwenkit import LLM, SamplingParams, kernels


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of 3..80 tokens; every third starts with the same 32 tokens (two cache blocks)."""
    rng = random.Random(seed)
    shared = [rng.randrange(5, 300) for _ in range(32)]
    out = []
    for i in range(n):
        own = [rng.randrange(5, 300) for _ in range(rng.randrange(3, 48))]
        out.append(shared + own if i % 3 == 0 else own)
    return out


def params(i: int, max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_p=0.9, seed=1000 + i, max_tokens=max_tokens, ignore_eos=True,
                          logprobs=True)


def numbers(out) -> tuple[list[int], list[float]]:
    """A completion's tokens and their logprobs."""
    return out.token_ids, [t.logprob for t in out.outputs[0].logprobs]


def alone(llm: LLM, ps: list[list[int]], max_tokens: int = 8) -> list:
    return [numbers(llm.generate(p, params(i, max_tokens))[0]) for i, p in enumerate(ps)]


def in_batches(llm: LLM, ps: list[list[int]], rng: random.Random, max_tokens: int = 8) -> list:
    """Every prompt once, in shuffled batches of 1..16, each prompt with its own seed."""
    order = list(range(len(ps)))
    rng.shuffle(order)
    got: list = [None] * len(ps)
    while order:
        batch = order[: rng.randint(1, 16)]
        order = order[len(batch):]
        outs = llm.generate([ps[i] for i in batch], [params(i, max_tokens) for i in batch])
        for i, out in zip(batch, outs):
            got[i] = numbers(out)
    return got


@pytest.fixture(scope="module")
def folder(tiny_checkpoints):
    return str(tiny_checkpoints("qwen3"))


def test_alone_equals_any_batch_chunked_or_cached(folder):
    ps = prompts(24)
    want = alone(LLM(folder, dtype="float32", progress=False, deterministic=True, enable_prefix_caching=False), ps)
    # Prefix caching on (runs after the first hit the shared prefix), and a 40-token step budget:
    # long prompts are chunked, and chunks share steps with other prompts and with decodes.
    llm = LLM(folder, dtype="float32", progress=False, deterministic=True, max_num_batched_tokens=40)
    rng = random.Random(7)
    for _ in range(2):
        assert in_batches(llm, ps, rng) == want
    assert alone(llm, ps) == want


def test_without_the_switch_batches_change_numbers(folder):
    """What the switch is for: without it, row counts pick different GEMM kernels and chunks a
    different attention, and the logprobs move (where they sit near a tie, a token flips)."""
    ps = prompts(24)
    llm = LLM(folder, dtype="float32", progress=False, max_num_batched_tokens=40)
    want = alone(LLM(folder, dtype="float32", progress=False, enable_prefix_caching=False), ps)
    assert in_batches(llm, ps, random.Random(7)) != want


def test_matmuls_are_row_invariant_under_the_switch():
    torch.manual_seed(0)
    x, w = torch.randn(37, 96), torch.randn(160, 96)
    with kernels.batch_invariant():
        rows = torch.cat([kernels.linear(x[i : i + 1], w) for i in range(37)])
        assert torch.equal(kernels.linear(x, w), rows)
        assert torch.equal(kernels.linear(x[5:20], w), rows[5:20])
    assert not kernels.is_batch_invariant()


@pytest.mark.slow
def test_the_default_model_alone_equals_any_batch(default_gguf):
    """The quantized default model: native int8 / Q5_0 matmuls and the fused C decode step,
    whose groups of kernels.INVARIANT_ROWS rows match the module path's blocks."""
    llm = LLM(str(default_gguf), progress=False, deterministic=True, max_num_batched_tokens=64)
    tok = llm.tokenizer
    questions = ["Write a Python function that reverses a string.", "What is 2 + 2?", "Name three sorting algorithms.",
                 "def fib(n):", "Explain recursion in one sentence.", "Say hi.", "What does `git rebase` do?"]
    ps = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))
          for q in questions]
    fresh = LLM(str(default_gguf), progress=False, deterministic=True, enable_prefix_caching=False)
    want = alone(fresh, ps)
    assert in_batches(llm, ps, random.Random(3)) == want
    assert alone(llm, ps) == want  # the chat template's system prompt now a cached prefix
