"""The batched sampler on hand-made logits: each parameter's exact effect, per-row seeded
streams that do not depend on the batch, logprobs, and SamplingParams validation."""

import re

import pytest
import torch

from qwenkit.config import GenerationConfig
from qwenkit.engine.sampler import Sampler, SamplingState, sample
from qwenkit.errors import ModelLoadError
from qwenkit.sampling import QWEN3_THINKING, SamplingDefaults, SamplingParams
from qwenkit.sampling_fields import MAX_N

V = 32
EOS = 3


def state(prompt=(1, 2), output=(), eos=(EOS,), **kwargs) -> SamplingState:
    params = SamplingParams(**kwargs).resolved(GenerationConfig())
    st = SamplingState.create(params, list(prompt), frozenset(eos), "cpu")
    st.output_token_ids.extend(output)
    return st


def row_logits(seed=0, vocab=V) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 2


def draw(logits, st, steps=1, **kwargs) -> list[int]:
    logits = logits[None] if logits.dim() == 1 else logits
    return [Sampler()(logits, [st], **kwargs)[0].token_id for _ in range(steps)]


def support(logits, steps=300, allowed=None, **kwargs) -> set[int]:
    return set(draw(logits, state(seed=0, **kwargs), steps, allowed=allowed))


def test_greedy_is_argmax_and_draws_no_randomness():
    logits = row_logits()
    st = state(temperature=0, seed=5)
    before = st.generator.get_state()
    assert draw(logits, st, 3) == [int(logits.argmax())] * 3
    assert torch.equal(st.generator.get_state(), before)


def test_top_k_1_is_greedy():
    logits = row_logits()
    assert support(logits, 50, temperature=1.5, top_k=1) == {int(logits.argmax())}


def test_top_k_keeps_the_k_best():
    logits = row_logits()
    assert support(logits, 400, temperature=2.0, top_k=4) == set(logits.topk(4).indices.tolist())


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04])
    logits = probs.log()
    assert support(logits, 400, temperature=1.0, top_p=0.7) == {0, 1}  # 0.5 < 0.7 <= 0.75
    assert support(logits, 400, temperature=1.0, top_p=0.8) == {0, 1, 2}
    assert support(logits, 50, temperature=1.0, top_p=0.4) == {0}


def test_top_p_over_a_large_flat_vocabulary_needs_the_full_sort():
    # The best 1024 of 4096 equal tokens hold 1/4 of the mass: the sampler must sort them all.
    logits = torch.zeros(4096)
    logits[:2] = 20.0
    assert support(logits, 50, temperature=1.0, top_p=0.5) <= {0, 1}
    flat = torch.zeros(4096)
    assert len(support(flat, 200, temperature=1.0, top_p=0.9)) > 150


def test_min_p_drops_tokens_below_min_p_times_the_best():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = probs.log()
    assert support(logits, 400, temperature=1.0, min_p=0.3) == {0, 1, 2}  # 0.15 >= 0.12 > 0.1
    assert support(logits, 400, temperature=1.0, min_p=0.5) == {0, 1}


def test_logit_bias_bans_and_forces():
    logits = row_logits()
    best = int(logits.argmax())
    assert draw(logits, state(temperature=0, logit_bias={best: -100})) != [best]
    assert support(logits, 100, temperature=1.0, logit_bias={7: 100}) == {7}
    # OpenAI's JSON sends the ids as strings.
    assert SamplingParams(logit_bias={"7": 100, 2: -5.5}).logit_bias == ((2, -5.5), (7, 100.0))


def test_allowed_mask_is_respected_at_any_temperature():
    logits = row_logits()
    mask = torch.zeros(V, dtype=torch.bool)
    mask[[4, 9, 20]] = True
    assert support(logits, 300, temperature=2.0, allowed=[mask]) == {4, 9, 20}
    # The bias cannot bring back a disallowed token.
    assert draw(logits, state(temperature=0, logit_bias={5: 100}), allowed=[mask]) != [5]
    short = torch.zeros(V - 4, dtype=torch.bool)  # a mask over the tokenizer's vocab only
    short[11] = True
    assert draw(logits, state(temperature=1.0), 20, allowed=[short]) == [11] * 20


def test_min_tokens_suppresses_eos_and_stop_ids_until_reached():
    logits = torch.zeros(V)
    logits[EOS] = 50.0
    logits[8] = 40.0
    st = state(temperature=0, min_tokens=2, stop_token_ids=[8])
    assert draw(logits, st) not in ([EOS], [8])
    st.output_token_ids.append(0)
    assert draw(logits, st) not in ([EOS], [8])
    st.output_token_ids.append(0)
    assert draw(logits, st) == [EOS]
    # A grammar that allows only the end of turn wins over min_tokens.
    only_eos = torch.zeros(V, dtype=torch.bool)
    only_eos[EOS] = True
    assert draw(logits, state(temperature=0, min_tokens=5), allowed=[only_eos]) == [EOS]


def processed(logits, st) -> torch.Tensor:
    """The logits after the penalties."""
    from qwenkit.engine.sampler import _apply_penalties

    x = logits[None].clone()
    _apply_penalties(x, [st])
    return x[0]


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = row_logits(3)
    prompt, output = [1, 5, 5, 9], [9, 12, 30]
    st = state(prompt=prompt, output=output, repetition_penalty=1.3)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits[None].clone())[0]
    torch.testing.assert_close(processed(logits, st), expected)


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = torch.zeros(V)
    st = state(prompt=[6, 6, 6], output=[4, 4, 4, 7], presence_penalty=0.5, frequency_penalty=0.25)
    out = processed(logits, st)
    assert out[4].item() == pytest.approx(-(0.5 + 3 * 0.25))
    assert out[7].item() == pytest.approx(-(0.5 + 1 * 0.25))
    assert out[6].item() == 0.0 and out[0].item() == 0.0
    negative = processed(logits, state(output=[4, 4], presence_penalty=-1.0, frequency_penalty=-2.0))
    assert negative[4].item() == pytest.approx(1.0 + 4.0)


def test_seeded_rows_do_not_depend_on_the_batch():
    vocab = 50
    logits = torch.stack([row_logits(i, vocab) for i in range(8)])
    kinds = [
        dict(temperature=0.8, top_k=20, top_p=0.9),
        dict(temperature=1.0),
        dict(temperature=0.7, top_p=0.8),
        dict(temperature=0),
        dict(temperature=1.2, min_p=0.1, top_k=5),
        dict(temperature=0.9, repetition_penalty=1.2, presence_penalty=0.5),
    ]

    def run(kind_index, position, steps=12):
        batch = [state(seed=100 + i, **kinds[(i + 1) % len(kinds)]) for i in range(8)]
        batch[position] = state(seed=7, **kinds[kind_index])
        rows = logits.clone()
        rows[position] = logits[0]
        tokens = []
        for _ in range(steps):
            out = Sampler()(rows, batch)
            tokens.append(out[position].token_id)
            for st, o in zip(batch, out):
                st.output_token_ids.append(o.token_id)
        return tokens

    for kind_index in range(len(kinds)):
        alone = state(seed=7, **kinds[kind_index])
        tokens = []
        for _ in range(12):
            tokens.append(Sampler()(logits[:1], [alone])[0].token_id)
            alone.output_token_ids.append(tokens[-1])
        assert run(kind_index, 0) == tokens
        assert run(kind_index, 5) == tokens


def test_distinct_seeds_differ_and_unseeded_rows_are_random():
    logits = torch.zeros(V)
    runs = {tuple(draw(logits, state(temperature=1.0, seed=s), 10)) for s in range(4)}
    assert len(runs) == 4
    assert draw(logits, state(temperature=1.0), 10) != draw(logits, state(temperature=1.0), 10)


def test_temperature_sampling_matches_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temperature = 0.8
    expected = (logits / temperature).softmax(-1)
    n = 4000
    st = state(temperature=temperature, seed=123)
    counts = torch.bincount(torch.tensor(draw(logits, st, n)), minlength=6).double()
    chi2 = (((counts - n * expected) ** 2) / (n * expected)).sum().item()
    assert chi2 < 25  # 5 degrees of freedom: p < 1e-4 when the sampler is right


def test_logprobs_are_of_the_raw_logits():
    logits = row_logits(4)
    st = state(temperature=0.5, top_k=3, logit_bias={0: 10}, seed=1, logprobs=True, top_logprobs=5)
    out = Sampler()(logits[None], [st])[0]
    raw = logits.log_softmax(-1)
    assert out.logprob == pytest.approx(raw[out.token_id].item(), abs=1e-5)
    assert [i for i, _ in out.top_logprobs] == raw.topk(5).indices.tolist()
    values = [v for _, v in out.top_logprobs]
    assert values == sorted(values, reverse=True) and len(values) == 5
    plain = Sampler()(logits[None], [state(temperature=0)])[0]
    assert plain.logprob is None and plain.top_logprobs is None
    assert Sampler()(logits[None], [state(temperature=0, logprobs=True)])[0].top_logprobs == []


def test_logits_are_not_modified():
    logits = torch.stack([row_logits(0), row_logits(1)])
    before = logits.clone()
    Sampler()(logits, [state(temperature=0.7, repetition_penalty=1.5, output=[1]), state(temperature=1.0)])
    assert torch.equal(logits, before)


def test_single_row_sample_still_works():
    logits = row_logits()
    params = SamplingParams(temperature=0).resolved(GenerationConfig())
    assert sample(logits, params, None) == int(logits.argmax())
    params = SamplingParams(temperature=1.0, seed=3).resolved(GenerationConfig())
    assert sample(logits, params, torch.Generator().manual_seed(3)) == sample(
        logits, params, torch.Generator().manual_seed(3)
    )


def test_resolved_fills_new_fields():
    g = GenerationConfig(sampling={"min_p": 0.05, "repetition_penalty": 1.05})
    p = SamplingParams().resolved(g)
    assert (p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (0.05, 1.05, 0.0, 0.0)
    p = SamplingParams(min_p=0.2, presence_penalty=1.5).resolved(GenerationConfig(), QWEN3_THINKING)
    assert (p.min_p, p.repetition_penalty, p.presence_penalty, p.top_k) == (0.2, 1.0, 1.5, 20)
    with pytest.raises(ValueError, match="resolved"):
        SamplingState.create(SamplingParams(), [1], frozenset(), "cpu")


def test_params_stay_hashable():
    a = SamplingParams(logit_bias={"5": 1}, stop=["x"])
    assert hash(a) == hash(SamplingParams(logit_bias={5: 1.0}, stop="x")) and a == SamplingParams(logit_bias={5: 1}, stop="x")


@pytest.mark.parametrize(
    "kwargs,field,value",
    [
        (dict(n=0), "n", "0"),
        (dict(n=MAX_N + 1), "n", "17"),
        (dict(top_logprobs=21, logprobs=True), "top_logprobs", "21"),
        (dict(top_logprobs=2), "top_logprobs", "2"),  # needs logprobs=True
        (dict(min_p=1.5), "min_p", "1.5"),
        (dict(presence_penalty=3), "presence_penalty", "3"),
        (dict(frequency_penalty=-2.5), "frequency_penalty", "-2.5"),
        (dict(repetition_penalty=0), "repetition_penalty", "0"),
        (dict(logit_bias={"x": 1}), "logit_bias", "'x'"),
        (dict(logit_bias={5: 200}), "logit_bias", "200"),
        (dict(min_tokens=10, max_tokens=5), "min_tokens", "10"),
        (dict(min_tokens=-1), "min_tokens", "-1"),
        (dict(max_tokens=-1), "max_tokens", "-1"),
    ],
)
def test_bad_params_name_the_field_and_value(kwargs, field, value):
    with pytest.raises(ValueError, match=field) as e:
        SamplingParams(**kwargs)
    assert value in str(e.value)


def test_token_ids_past_the_vocabulary_are_rejected():
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={V: 1}).check_token_ids(V)
    with pytest.raises(ValueError, match="logit_bias"):
        Sampler()(torch.zeros(1, V), [state(logit_bias={V + 3: 1})])


def test_generation_config_reads_the_tables_model_defaults():
    g = GenerationConfig.from_hf({"temperature": 0.6, "top_k": 20, "frequency_penalty": 0.5, "top_p": None,
                                  "n": 3, "do_sample": True})
    assert g.sampling == {"temperature": 0.6, "top_k": 20, "frequency_penalty": 0.5}  # n is not a model default
    p = SamplingParams(top_k=5).resolved(g, QWEN3_THINKING)
    assert (p.temperature, p.top_k, p.top_p, p.frequency_penalty, p.min_p) == (0.6, 5, 0.95, 0.5, 0.0)
    assert SamplingParams().resolved(GenerationConfig.from_hf({"temperature": 0.6, "do_sample": False})).temperature == 0


@pytest.mark.parametrize("key, value, says", [
    ("temperature", 2.5, "temperature must be a finite number >= 0 and <= 2, got 2.5"),
    ("top_k", 2.5, "top_k must be an integer"),
    ("top_p", "0.9", "top_p must be a number, got '0.9'"),
])
def test_generation_config_refuses_a_default_out_of_its_rows_range(key, value, says):
    with pytest.raises(ModelLoadError, match=re.escape(f"generation_config.json: {says}")):
        GenerationConfig.from_hf({key: value})


def test_sampling_defaults_name_only_model_defaults():
    with pytest.raises(ValueError, match="seed has no model default"):
        SamplingDefaults({"seed": 1})
    with pytest.raises(ValueError, match="top_p must be"):
        SamplingDefaults({"top_p": 0})
