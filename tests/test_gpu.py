"""On a CUDA device: the engine against transformers on the same weights, with the paths a
GPU user gets by default (Triton kernels, CUDA graphs, grouped MoE), and the CLI with no
flags. Skipped without a GPU (the same paths are proven on the CPU by test_cuda_path.py,
test_cuda_kernels.py and test_device_placement.py)."""

import subprocess
import sys

import pytest
import torch
from tiny import ARCHS, make_checkpoint

from qwenkit import LLM, SamplingParams
from qwenkit.models.attention import AttentionMetadata

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_checkpoint(path, request.param)
    return str(path), hf


def hf_greedy(hf, prompt: list[int], steps: int):
    """transformers' greedy tokens and each step's log-softmax [steps, vocab] (no KV cache)."""
    ids = torch.tensor([prompt], device="cuda")
    tokens, logprobs = [], []
    with torch.inference_mode():
        for _ in range(steps):
            lp = hf(ids).logits[0, -1].float().log_softmax(-1)
            token = int(lp.argmax())
            tokens.append(token)
            logprobs.append(lp)
            ids = torch.cat([ids, torch.tensor([[token]], device="cuda")], dim=1)
    return tokens, torch.stack(logprobs)


def test_float32_matches_transformers(checkpoint):
    folder, hf = checkpoint
    hf = hf.to("cuda", torch.float32)
    llm = LLM(folder, dtype="float32", device="cuda", progress=False, max_num_seqs=16)
    prompt = [5 + 7 * i % 300 for i in range(12)]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=True,
                                              top_logprobs=5))[0]
    tokens, ref = hf_greedy(hf, prompt, 32)
    assert out.token_ids == tokens
    for step, token_output in enumerate(out.outputs[0].logprobs):
        for token_id, logprob in token_output.top_logprobs:
            assert logprob == pytest.approx(float(ref[step, token_id]), abs=1e-4)


def test_batch_equals_single(checkpoint):
    folder, _ = checkpoint
    llm = LLM(folder, dtype="float32", device="cuda", progress=False, max_num_seqs=16)
    prompts = [[(7 * i + 3 * j) % 300 + 5 for j in range(5 + 8 * i)] for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    batched = [o.token_ids for o in llm.generate(prompts, params)]
    assert batched == [llm.generate(p, params)[0].token_ids for p in prompts]


def test_bfloat16_drift_within_twice_transformers_own(checkpoint):
    """bfloat16 logits against float32 ones: qwenkit drifts no more than 2x transformers."""
    folder, hf = checkpoint
    prompt = torch.tensor([[5 + 11 * i % 300 for i in range(24)]], device="cuda")
    with torch.inference_mode():
        ref = hf.to("cuda", torch.float32)(prompt).logits[0].float()
        hf_bf16 = hf.to(torch.bfloat16)(prompt).logits[0].float()
        llm = LLM(folder, dtype="bfloat16", device="cuda", progress=False, max_num_seqs=16)
        model = llm.model
        kv = model.allocate_kv_cache(prompt.shape[1])
        meta = AttentionMetadata.contiguous(start=0, num_tokens=prompt.shape[1], device="cuda")
        positions = torch.arange(prompt.shape[1], device="cuda")
        ours = model.compute_logits(model(prompt[0], positions, kv, meta))
    ours_drift = (ours - ref).abs().max().item()
    hf_drift = (hf_bf16 - ref).abs().max().item()
    print(f"bfloat16 drift: qwenkit {ours_drift:.4f}, transformers {hf_drift:.4f}")
    assert ours_drift <= 2 * hf_drift + 1e-3


def test_cli_run_with_no_flags(checkpoint):
    folder, _ = checkpoint
    done = subprocess.run([sys.executable, "-m", "qwenkit", "run", "--model", folder, "--max-tokens", "4", "Hello"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
