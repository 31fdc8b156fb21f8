"""A Qwen3-MoE GGUF's experts kept in their K-quant blocks on CPU (models/quant.py `GGUFExperts`,
csrc/moe.c) against the same weights dequantized to floats by gguf-py.

The tiny model's experts mix the types a Q4_K_M file mixes (Q4_K gate and up, Q6_K or Q4_K down)
and Q5_K; everything else is float32, so the experts are all that differs. The float model's own
greedy tokens are fed to the quantized one: the native kernel rounds each expert's activations to
int8 per 256 values (as llama.cpp's K-quant matmuls do), which moves the logprobs by what that
rounding explains (bounded below, measured ~1e-3); the dequantizing path (no native kernels)
computes the float model's numbers up to float rounding.
"""

from __future__ import annotations

from unittest.mock import patch

import gguf
import numpy as np
import pytest
import torch
import test_gguf
from test_gguf import random_blocks, write_gguf

from qwenkit import LLM, SamplingParams, kernels
from qwenkit.kernels import cpu, reference
from qwenkit.kernels.ops import moe as moe_ops
from qwenkit.loader.gguf import GGUFTensor, _read_header
from qwenkit.models.attention import AttentionMetadata
from qwenkit.models.quant import GGUFExperts

transformers = pytest.importorskip("transformers")
needs_native = pytest.mark.skipif(cpu.library() is None, reason="no C compiler: the native kernels are not built")

# layer -> (gate, up, down) types of its experts: Q4_K_M's two kinds of layer, and Q5_K.
EXPERT_TYPES = {0: ("Q4_K", "Q4_K", "Q6_K"), 1: ("Q5_K", "Q4_K", "Q4_K")}
GREEDY_TOKENS = 32


def _tiny_moe():
    """A Qwen3-MoE whose expert rows are whole 256-value K-quant super-blocks."""
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        vocab_size=256, intermediate_size=256, moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 and "norm" in name else 0.1 * torch.randn_like(p))
    return model


def _centred(blocks: np.ndarray, tensor_type) -> np.ndarray:
    """K-quant blocks of random values whose scales and mins centre them on 0 (as a real model's are,
    where `random_blocks`' all-random scales and mins give every expert weight a mean of ~0.04, which
    makes each expert's output one large sum of its inputs): Q4_K / Q5_K with every block's 6-bit scale
    and min c (random, below 16) and dmin = d (2^bits - 1) / 2, so w = d c (u - (2^bits - 1) / 2)."""
    if tensor_type == gguf.GGMLQuantizationType.Q6_K:
        return blocks  # w = d sc (u - 32): centred already
    type_size = gguf.GGML_QUANT_SIZES[tensor_type][1]
    flat = blocks.reshape(-1, type_size)
    rng = np.random.default_rng(len(flat))
    c = rng.integers(1, 16, (len(flat), 1), dtype=np.uint8)
    flat[:, 4:12] = c
    flat[:, 12:16] = c | (c << 4)
    levels = 15 if tensor_type == gguf.GGMLQuantizationType.Q4_K else 31
    d = np.full((len(flat), 1), 1e-3, np.float16)
    flat[:, 0:2] = d.view(np.uint8)
    flat[:, 2:4] = (d * levels / 2).astype(np.float16).view(np.uint8)
    return flat.reshape(blocks.shape)


def _expert_type(gguf_name: str) -> str:
    for kind, i in (("ffn_gate_exps", 0), ("ffn_up_exps", 1), ("ffn_down_exps", 2)):
        if f".{kind}." in gguf_name:
            return EXPERT_TYPES[int(gguf_name.split(".")[1])][i]
    return "F32"


def _centred_random_blocks(shape, tensor_type, *, seed):
    return _centred(random_blocks(shape, tensor_type, seed=seed), tensor_type)


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "moe.gguf"
    with patch.object(test_gguf, "random_blocks", _centred_random_blocks):
        return write_gguf(path, _tiny_moe(), "qwen3moe", weight_type=_expert_type)


@pytest.fixture(scope="module")
def models(moe_gguf):
    """(experts kept quantized, the float model)."""
    return (LLM(str(moe_gguf), dtype="float32", progress=False),
            LLM(str(moe_gguf), dtype="float32", quantization="none", progress=False))


def _logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Log-softmax of the logits at every position of one prefill of `ids`."""
    with torch.inference_mode():
        kv = llm.model.allocate_kv_cache(len(ids))
        meta = AttentionMetadata.contiguous(start=0, num_tokens=len(ids))
        hidden = llm.model(torch.tensor(ids), torch.arange(len(ids)), kv, meta)
        return llm.model.compute_logits(hidden).log_softmax(-1)


@needs_native
def test_experts_stay_as_stored_and_mapped(moe_gguf, models):
    quantized, floats = models
    _, infos = _read_header(moe_gguf)
    for layer, types in EXPERT_TYPES.items():
        experts = quantized.model.model.layers[layer].mlp.experts
        assert isinstance(experts, GGUFExperts) and experts.types == types
        for name, kind in (("gate", "gate"), ("up", "up"), ("down", "down")):
            info = infos[f"blk.{layer}.ffn_{kind}_exps.weight"]
            raw = GGUFTensor(moe_gguf, info).read_raw(0, 8)
            assert torch.equal(getattr(experts, name).flatten(1), raw)
        # the float model's experts are gguf-py's dequantization of the same blocks
        want = gguf.quants.dequantize(GGUFTensor(moe_gguf, infos[f"blk.{layer}.ffn_down_exps.weight"]).read_raw(0, 8)
                                      .numpy().reshape(8, 256, -1), gguf.GGMLQuantizationType[types[2]])
        assert np.array_equal(floats.model.model.layers[layer].mlp.experts.down_proj.numpy(), want.reshape(8, 256, 256))
    expert_bytes = sum(b.numel() for b in experts.buffers())
    assert expert_bytes < floats.model.model.layers[1].mlp.experts.down_proj.numel() * 4 * 3 / 5


def _greedy(llm: LLM, prompts: list[list[int]]):
    params = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True, logprobs=True)
    return [out.outputs[0] for out in llm.generate(prompts, params)]


# A long prompt gives some experts more rows than the kernels' decode path takes (their panel path).
PROMPTS = [list(range(3, 40)), list(range(100, 110)), [7] * 5, list(range(3, 250))]


def _chosen(logprobs: torch.Tensor, ids: list[int], prompt_len: int) -> torch.Tensor:
    """The logprobs of tokens ids[prompt_len:], each at the position before it."""
    return logprobs[prompt_len - 1 : -1].gather(1, torch.tensor(ids[prompt_len:])[:, None])[:, 0]


def test_dequantizing_path_is_the_float_model(models, monkeypatch):
    """Without the native MoE kernel the experts' blocks are dequantized per expert (gguf's values;
    here by the C dequantizer, bit for bit gguf's, where the torch-only build takes gguf-py's) and
    multiplied in float32: the float model's greedy tokens in three streams, and its logprobs up to
    float rounding, decode and prefill."""
    quantized, floats = models
    if not isinstance(quantized.model.model.layers[0].mlp.experts, GGUFExperts):
        pytest.skip("the experts load as floats where the native kernels are not built")
    monkeypatch.setattr(moe_ops, "_gguf_experts",
                        lambda *args: reference.gguf_experts(*args, dequantize=kernels.gguf_dequantize))
    # One thread: this path is many tiny torch matmuls, each a parallel region whose waits cost more
    # than its arithmetic (20 s against 2 on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_dequantizing_path(quantized, floats)
    finally:
        torch.set_num_threads(threads)


def _check_dequantizing_path(quantized: LLM, floats: LLM) -> None:
    want = _greedy(floats, PROMPTS[:3])
    for w, g in zip(want, _greedy(quantized, PROMPTS[:3])):
        assert g.token_ids == w.token_ids
        assert max(abs(a.logprob - b.logprob) for a, b in zip(g.logprobs, w.logprobs)) <= 1e-4
    ids = PROMPTS[0] + want[0].token_ids
    want, got = _logprobs(floats, ids), _logprobs(quantized, ids)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# The native kernel's logprobs of the float model's greedy tokens, fed step by step, are off by what the
# activations' int8 rounding (per 256 values) explains, through this chaotic random model (0.1 randn
# weights; a near tie of the router that a rounding flips changes an expert): measured at most 0.09
# teacher-forced in one prefill and 0.28 in decode steps over the prompts below (most steps under
# 0.03); next-token choices agree wherever the float model's top two are further apart than twice the bound.
NATIVE_LOGPROB_BOUND = 0.4


@needs_native
@pytest.mark.parametrize("prompt", PROMPTS, ids=["37", "10", "5-same", "247"])
def test_native_experts_against_the_float_model(models, prompt):
    quantized, floats = models
    ids = prompt + _greedy(floats, [prompt])[0].token_ids
    want, got = _logprobs(floats, ids)[len(prompt) - 1 : -1], _logprobs(quantized, ids)[len(prompt) - 1 : -1]
    tokens = torch.tensor(ids[len(prompt):])[:, None]
    assert (got.gather(1, tokens) - want.gather(1, tokens)).abs().max() <= NATIVE_LOGPROB_BOUND
    top2 = want.topk(2, -1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * NATIVE_LOGPROB_BOUND
    assert clear.any()
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


@needs_native
@pytest.mark.parametrize("streams", [1, 3])
def test_native_decode_against_the_float_model(models, streams):
    """Decode steps, one and three streams: each token the quantized model picks is the float model's
    choice after the same tokens wherever that is clear, with its logprob within the bound above."""
    quantized, floats = models
    for prompt, out in zip(PROMPTS, _greedy(quantized, PROMPTS[:streams])):
        ids = prompt + out.token_ids
        want = _logprobs(floats, ids)[len(prompt) - 1 : -1]
        got = torch.tensor([t.logprob for t in out.logprobs])
        assert (got - want.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]).abs().max() <= NATIVE_LOGPROB_BOUND
        top2 = want.topk(2, -1).values
        clear = top2[:, 0] - top2[:, 1] > 2 * NATIVE_LOGPROB_BOUND
        assert torch.equal(torch.tensor(out.token_ids)[clear], want.argmax(-1)[clear])


@needs_native
@pytest.mark.parametrize("num_tokens", [1, 5, 150])
def test_native_experts_equal_the_kernels_matmuls(num_tokens):
    """csrc/moe.c against each token's experts through `gguf_linear` one at a time (the same
    kernels, so the same numbers up to the sum's order) and against the dequantized floats."""
    g = torch.Generator().manual_seed(num_tokens)
    num_experts, hidden, intermediate, top_k = 16, 512, 256, 4
    types = ("Q4_K", "Q5_K", "Q6_K")

    def blocks(shape, type_name, seed):
        return torch.from_numpy(random_blocks(shape, gguf.GGMLQuantizationType[type_name], seed=seed))

    gate = blocks((num_experts, intermediate, hidden), "Q4_K", 1)
    up = blocks((num_experts, intermediate, hidden), "Q5_K", 2)
    down = blocks((num_experts, hidden, intermediate), "Q6_K", 3)
    x = torch.randn(num_tokens, hidden, generator=g)
    expert_ids = torch.stack([torch.randperm(num_experts // 2, generator=g)[:top_k] * 2 for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=g)
    got = kernels.gguf_experts(x, expert_ids, weights, gate, up, down, ",".join(types))
    if num_tokens * top_k // (num_experts // 2) < 64:  # every expert's rows on the decode path: row by row alike
        one_by_one = torch.zeros_like(got)
        for t in range(num_tokens):
            for k, e in enumerate(expert_ids[t].tolist()):
                xt = x[t : t + 1]
                act = kernels.silu_and_mul(torch.cat([kernels.gguf_linear(xt, gate[e], hidden, types[0]),
                                                      kernels.gguf_linear(xt, up[e], hidden, types[1])], dim=1))
                one_by_one[t] += weights[t, k] * kernels.gguf_linear(act, down[e], intermediate, types[2])[0]
        torch.testing.assert_close(got, one_by_one, atol=1e-5, rtol=1e-5)
    floats = reference.gguf_experts(x, expert_ids, weights, gate, up, down, ",".join(types))
    assert ((got - floats).abs().max() / floats.abs().max()) < 3e-2
    with pytest.raises(ValueError, match="expert id outside"):
        kernels.gguf_experts(x, expert_ids + 100, weights, gate, up, down, ",".join(types))


@needs_native
@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_other_variants_compute_the_same_experts(isa):
    """The plain C build (QK_NO_SIMD) and the AVX2 one take the same experts to the same numbers up to
    float summation order (this CPU's own variant is the reference)."""
    if isa not in cpu.supported_isas():
        pytest.skip(f"this CPU does not run the {isa} variant")
    other, lib = cpu.load(isa), cpu.library()
    g = torch.Generator().manual_seed(3)
    gate = torch.from_numpy(random_blocks((4, 256, 512), gguf.GGMLQuantizationType.Q4_K, seed=4))
    up = torch.from_numpy(random_blocks((4, 256, 512), gguf.GGMLQuantizationType.Q5_K, seed=5))
    down = torch.from_numpy(random_blocks((4, 512, 256), gguf.GGMLQuantizationType.Q6_K, seed=6))
    for tokens in (1, 3, 150):  # 150 x 2 / 4: experts past the decode path's 64 rows in the SIMD builds
        x = torch.randn(tokens, 512, generator=g)
        expert_ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(tokens)])
        weights = torch.rand(tokens, 2, generator=g)
        args = (x, expert_ids, weights, gate, up, down, "Q4_K,Q5_K,Q6_K")
        want = lib.gguf_experts(*args)
        torch.testing.assert_close(other.gguf_experts(*args), want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)
