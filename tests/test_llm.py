"""`LLM.generate` on tiny checkpoints: greedy parity with transformers, stopping, seeds, errors."""

import pytest
import torch
from tiny import ARCHS, make_checkpoint

from qwenkit import LLM, SamplingParams
from qwenkit.errors import ContextLengthError


@pytest.fixture(scope="module")
def tiny_qwen3(tiny_checkpoints):
    return LLM(str(tiny_checkpoints("qwen3")), dtype="float32", progress=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_matches_transformers(tmp_path, arch):
    ref = make_checkpoint(tmp_path, arch)
    llm = LLM(str(tmp_path), dtype="float32", progress=False)
    prompt = llm.tokenizer.encode("Hello world! def add(a, b):")
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    with torch.inference_mode():
        expected = ref.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=24, min_new_tokens=24,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )[0, len(prompt):].tolist()
    assert out.token_ids == expected
    assert out.prompt_token_ids == prompt
    assert out.finish_reason == "length"
    assert out.text == llm.tokenizer.decode(expected, skip_special_tokens=True)


def test_string_prompts_and_batches(tiny_qwen3):
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outs = tiny_qwen3.generate(["Hello", "def add"], params)
    assert [o.prompt for o in outs] == ["Hello", "def add"]
    assert outs[0].token_ids == tiny_qwen3.generate("Hello", params)[0].token_ids


def test_stop_string_across_tokens_is_not_emitted(tiny_qwen3):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = tiny_qwen3.generate("Hello", params)[0]
    # A stop string straddling a token boundary inside the greedy output.
    pieces = [tiny_qwen3.tokenizer.decode([t]) for t in full.token_ids]
    cut = next(i for i in range(1, len(pieces)) if pieces[i - 1] and pieces[i])
    prefix = "".join(pieces[: cut - 1])
    stop = pieces[cut - 1][-1:] + pieces[cut][:1]
    assert stop in full.text
    expected = full.text[: full.text.index(stop)]
    out = tiny_qwen3.generate("Hello", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=stop))[0]
    assert out.finish_reason == "stop"
    assert out.text == expected
    assert expected.startswith(prefix[: len(expected)])


def test_eos_and_stop_token_ids_end_generation(tiny_qwen3):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    full = tiny_qwen3.generate("Hello", params)[0]
    stop_at = full.token_ids[3]
    out = tiny_qwen3.generate(
        "Hello", SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at])
    )[0]
    first = full.token_ids.index(stop_at)
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(tiny_qwen3):
    def sample(seed):
        p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, seed=seed, ignore_eos=True)
        return tiny_qwen3.generate("Hello", p)[0].token_ids

    assert sample(7) == sample(7)
    assert len({tuple(sample(s)) for s in range(5)}) > 1


def test_top_k_1_is_greedy(tiny_qwen3):
    greedy = tiny_qwen3.generate("Hi", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    top1 = tiny_qwen3.generate("Hi", SamplingParams(temperature=0.8, top_k=1, max_tokens=8, ignore_eos=True))[0]
    assert greedy.token_ids == top1.token_ids


def test_prompt_longer_than_context_is_rejected(tiny_qwen3):
    with pytest.raises(ContextLengthError, match="the prompt is 600 tokens, but the model's context is 512"):
        tiny_qwen3.generate([5] * 600, SamplingParams(max_tokens=1))


def test_generation_stops_at_the_context_end(tiny_qwen3):
    out = tiny_qwen3.generate([5] * 500, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert len(out.token_ids) == 12
    assert out.finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(stop=[""]), "stop"),
        (dict(n=0), "n must"),
        (dict(min_p=-0.1), "min_p"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(logit_bias={"a": 1}), "logit_bias"),
        (dict(top_logprobs=3), "top_logprobs"),
        (dict(min_tokens=4, max_tokens=2), "min_tokens"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_token_ids_out_of_the_vocabulary_are_rejected(tiny_qwen3):
    with pytest.raises(ValueError, match="logit_bias"):
        tiny_qwen3.generate("Hi", SamplingParams(logit_bias={10**6: 5.0}))
    with pytest.raises(ValueError, match="stop_token_ids"):
        tiny_qwen3.generate("Hi", SamplingParams(stop_token_ids=[10**6]))


def test_logprobs_are_reported(tiny_qwen3):
    import math

    out = tiny_qwen3.generate("Hello", SamplingParams(temperature=0, max_tokens=4, logprobs=True, top_logprobs=3,
                                                      ignore_eos=True))[0]
    steps = out.outputs[0].logprobs
    assert [s.token_id for s in steps] == out.token_ids
    for s in steps:
        assert len(s.top_logprobs) == 3
        assert s.top_logprobs[0][0] == s.token_id  # greedy takes the likeliest
        assert math.isclose(s.top_logprobs[0][1], s.logprob)
