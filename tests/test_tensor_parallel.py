"""Tensor and expert parallelism on the CPU: two gloo ranks in two processes give the
single-process model's numbers, and a rank that dies fails requests cleanly."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny import ARCHS, make_checkpoint

from qwenkit import LLM, SamplingParams
from qwenkit.distributed.executor import EngineDeadError

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module", params=ARCHS)
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_checkpoint(path, request.param)
    return str(path)


def logits_of_each_step(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of the prompts run as one batch, and the logits every step sampled from."""
    seen = []
    sampler = llm.engine.sampler

    class Recording:
        def __call__(self, logits, states, **kwargs):
            seen.append(logits.clone())
            return sampler(logits, states, **kwargs)

    llm.engine.sampler = Recording()
    try:
        outs = llm.generate(prompts, GREEDY)
    finally:
        llm.engine.sampler = sampler
    return [o.token_ids for o in outs], seen


def prompts() -> list[list[int]]:
    return [[(5 * i + 3 * j) % 300 + 5 for j in range(4 + 9 * i)] for i in range(3)]


def stopped(llm: LLM) -> None:
    workers = llm.executor.workers
    llm.shutdown()
    assert all(w.poll() is not None for w in workers)


@pytest.mark.slow  # over 10 s (a whole engine in subprocesses, or many of them)
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_two_ranks_match_one_process(folder, expert_parallel):
    if expert_parallel and "moe" not in folder:
        pytest.skip("expert parallelism is for MoE models")
    # float32 caches: the ranks' partial sums round differently from one process's, and a
    # 16-bit cache (the CPU default) could turn that into a one-ulp different key.
    single = LLM(folder, dtype="float32", kv_cache_dtype="float32", progress=False)
    expected_tokens, expected = logits_of_each_step(single, prompts())
    llm = LLM(folder, dtype="float32", kv_cache_dtype="float32", progress=False, tensor_parallel_size=2,
              enable_expert_parallel=expert_parallel)
    try:
        attn, full = llm.model.model.layers[0].self_attn, single.model.model.layers[0].self_attn
        assert attn.num_heads * 2 == full.num_heads  # rank 0 holds half the heads
        assert attn.qkv_proj.weight.shape[0] * 2 == full.qkv_proj.weight.shape[0]
        tokens, got = logits_of_each_step(llm, prompts())
        assert tokens == expected_tokens
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        # Alone equals batched, across the ranks too.
        assert llm.generate(prompts()[1], GREEDY)[0].token_ids == expected_tokens[1]
    finally:
        stopped(llm)


def test_a_dead_rank_fails_requests_and_the_replica_stops(folder):
    if "qwen3_moe" in folder or "qwen2" in folder:
        pytest.skip("one architecture is enough")
    llm = LLM(folder, dtype="float32", progress=False, tensor_parallel_size=2)
    try:
        engine = llm.engine
        engine.add_request("r", prompts()[2], SamplingParams(max_tokens=50, ignore_eos=True))
        engine.step()
        os.kill(llm.executor.workers[0].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="rank 1 exited with code -9"):
            for _ in range(50):
                engine.step()
        assert time.monotonic() - start < 60  # failed, not hung
        with pytest.raises(EngineDeadError, match="rank 1"):
            llm.check_health()
    finally:
        stopped(llm)


@pytest.mark.slow  # over 10 s (a whole engine in subprocesses, or many of them)
def test_a_plain_script_runs_its_model_on_two_ranks(folder, tmp_path):
    """No `if __name__ == "__main__":`: the ranks never run the user's script (multiprocessing's
    spawn re-ran it in each, and failed); the answer is printed once, and the script exits
    with no rank left behind, without calling shutdown()."""
    if "qwen3_moe" in folder or "qwen2" in folder:
        pytest.skip("one architecture is enough")
    expected = LLM(folder, dtype="float32", progress=False).generate(prompts()[0], GREEDY)[0].token_ids
    script = tmp_path / "plain.py"
    script.write_text(
        "from qwenkit import LLM, SamplingParams\n"
        "print('script starts')\n"
        f"llm = LLM({folder!r}, dtype='float32', progress=False, tensor_parallel_size=2)\n"
        f"greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)\n"
        f"print('tokens', llm.generate({prompts()[0]!r}, greedy)[0].token_ids)\n"
        "print('workers', *(w.pid for w in llm.executor.workers))\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["script starts", f"tokens {expected}"] and len(lines) == 3, r.stdout
    worker = int(lines[2].split()[1])
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)
