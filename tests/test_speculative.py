"""Speculative decoding (prompt lookup) changes no output (issue #35).

Each test runs the same requests on an engine with `speculative="ngram"` and one without,
and compares what they give; a test of the drafts' use (`test_drafts_are_kept`) shows that the
speculative engine did check drafts, keep some and reject some, so that the comparisons are
not of two plain engines. The tiny random models repeat themselves, which prompt lookup
drafts from."""

import random

import pytest

from qwenkit import LLM, SamplingParams
from qwenkit.engine.speculative import NgramIndex, SpeculativeConfig
from qwenkit.errors import QwenkitError


def test_ngram_index_proposes_what_followed_the_latest_longest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    index = NgramIndex(2, 3)
    # suffix [2, 3]: latest earlier occurrence ends at 7, followed by 7, 8, 5
    assert index.propose(tokens, 3) == [7, 8, 5]
    tokens += [7]
    # suffix [2, 3, 7] (length 3 first): after it came 8, 5, 2, 3, 7
    assert index.propose(tokens, 10) == [8, 5, 2, 3, 7]
    assert index.propose([4, 5, 6], 4) == []  # nothing seen twice
    assert NgramIndex(2, 2).propose([5, 5, 5], 3) == [5]  # the continuation stops at the end


def test_config_parsing_names_what_is_wrong():
    assert SpeculativeConfig.parse("ngram").enabled
    assert SpeculativeConfig.parse("ngram:3").num_speculative_tokens == 3
    assert not SpeculativeConfig.parse(None).enabled and not SpeculativeConfig.parse("off").enabled
    for bad, words in [("ngram:0", "at least 1"), ("medusa", "choose ngram"), ("draft:", "names the draft model"),
                       ("eagle:/x", "EAGLE-3")]:
        with pytest.raises(QwenkitError, match=words):
            SpeculativeConfig.parse(bad)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a phrase (drafts to find) around random tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        phrase = [rng.randrange(5, 300) for _ in range(rng.randrange(4, 12))]
        noise = [rng.randrange(5, 300) for _ in range(rng.randrange(2, 20))]
        out.append(phrase + noise + phrase + noise[:3] + phrase)
    return out


@pytest.fixture(scope="module")
def pair(tiny_checkpoints):
    """The tiny Qwen3, plain and speculative (float32)."""
    folder = str(tiny_checkpoints("qwen3"))
    return (LLM(folder, dtype="float32", progress=False),
            LLM(folder, dtype="float32", progress=False, speculative="ngram"))


def numbers(out) -> tuple[list[int], list[float] | None]:
    logprobs = out.outputs[0].logprobs
    return out.token_ids, [t.logprob for t in logprobs] if logprobs else None


def test_drafts_are_kept_and_rejected(pair):
    plain, spec = pair
    before = dataclass_copy(spec.engine.spec_stats)
    spec.generate(prompts(6), SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    stats = spec.engine.spec_stats
    drafted = stats.draft_tokens - before.draft_tokens
    kept = stats.accepted_tokens - before.accepted_tokens
    assert drafted > 0 and 0 < kept < drafted, (drafted, kept)
    assert plain.engine.spec_stats.draft_tokens == 0


def dataclass_copy(stats):
    import dataclasses

    return dataclasses.replace(stats)


def test_greedy_batch_is_unchanged(pair):
    plain, spec = pair
    ps = prompts(8, seed=1)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=True)
    want = [numbers(o) for o in plain.generate(ps, params)]
    got = [numbers(o) for o in spec.generate(ps, params)]
    for (wt, wl), (gt, gl) in zip(want, got):
        assert gt == wt
        assert gl == pytest.approx(wl, abs=1e-4)


def test_sampled_with_seeds_is_unchanged(pair):
    """One uniform number per emitted token from the sequence's own generator, as without
    speculation: seeded sampling gives the same tokens (n=2 included)."""
    plain, spec = pair
    ps = prompts(4, seed=2)
    params = [SamplingParams(temperature=0.7, top_p=0.95, seed=10 + i, n=2, max_tokens=32, ignore_eos=True)
              for i in range(len(ps))]
    want = [[c.token_ids for c in o.outputs] for o in plain.generate(ps, params)]
    got = [[c.token_ids for c in o.outputs] for o in spec.generate(ps, params)]
    assert got == want


def test_stops_and_max_tokens(pair):
    """Nothing after a stop id or stop string leaks out of a step that kept several tokens,
    and max_tokens holds exactly."""
    plain, spec = pair
    ps = prompts(6, seed=3)
    base = plain.generate(ps, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    for p, b in zip(ps, base):
        # a stop id and a stop string from the middle of the plain run's output
        stop_id = b.token_ids[17]
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=[stop_id])
        assert spec.generate(p, params)[0].token_ids == plain.generate(p, params)[0].token_ids
        text = b.text
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        if stop.strip():
            params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
            want, got = plain.generate(p, params)[0], spec.generate(p, params)[0]
            assert (got.text, got.finish_reason) == (want.text, want.finish_reason)
        for n in (1, 5, 13):
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            out = spec.generate(p, params)[0]
            assert out.token_ids == b.token_ids[:n] and out.finish_reason == "length"


def test_streamed_tokens_are_the_whole_output(pair):
    """A step that kept drafts streams them all at once, in order."""
    plain, spec = pair
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    several = False
    for i, p in enumerate(prompts(4, seed=4)):
        seen = []
        spec.engine.add_request(f"stream{i}", p, params)
        while spec.engine.has_unfinished_requests():
            for update in spec.engine.step():
                seen.extend(t.token_id for t in update.outputs)
                several |= len(update.outputs) > 1
        assert seen == plain.generate(p, params)[0].token_ids
    assert several  # some step gave more than one token


def test_blocks_of_rejected_drafts_go_back(pair):
    _, spec = pair
    bm = spec.engine.block_manager
    free = bm.num_free_blocks
    spec.generate(prompts(4, seed=5), SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    assert bm.num_free_blocks == free
    assert not spec.engine.scheduler.running and not spec.engine.requests


def test_deterministic_logprobs_are_bit_for_bit(tiny_checkpoints):
    """With deterministic steps, tokens and logprobs to the bit, sampled at temperature 1."""
    folder = str(tiny_checkpoints("qwen3"))
    plain = LLM(folder, dtype="float32", progress=False, deterministic=True)
    spec = LLM(folder, dtype="float32", progress=False, deterministic=True, speculative="ngram")
    ps = prompts(5, seed=6)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=32, ignore_eos=True, logprobs=True)
              for i in range(len(ps))]
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=True)
    assert [numbers(o) for o in spec.generate(ps, params)] == [numbers(o) for o in plain.generate(ps, params)]
    assert [numbers(o) for o in spec.generate(ps, greedy)] == [numbers(o) for o in plain.generate(ps, greedy)]
    assert spec.engine.spec_stats.accepted_tokens > 0


def test_structured_output_and_thinking_budget(pair):
    """Controls see each kept token in turn: a JSON grammar and a thinking budget's forced
    close give what they give without speculation."""
    plain, spec = pair
    messages = [{"role": "user", "content": "a b c a b c a b c"}]
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
              "required": ["a", "b"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    params = SamplingParams(temperature=0, max_tokens=60)
    want = plain.chat(messages, params, response_format=fmt)
    got = spec.chat(messages, params, response_format=fmt)
    assert (got.content, got.finish_reason) == (want.content, want.finish_reason)
    params = SamplingParams(temperature=0, max_tokens=60)
    want = plain.chat(messages, params, enable_thinking=True, thinking_budget=12)
    got = spec.chat(messages, params, enable_thinking=True, thinking_budget=12)
    assert (got.reasoning_content, got.content, got.finish_reason) == \
        (want.reasoning_content, want.content, want.finish_reason)
    assert got.usage == want.usage


def test_engine_reports_speculation_off_by_flag(tiny_checkpoints):
    llm = LLM(str(tiny_checkpoints("qwen3")), dtype="float32", progress=False, speculative="off")
    llm.generate(prompts(2, seed=7), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert llm.engine.spec_stats.draft_tokens == 0


def test_a_draft_model_changes_no_output(pair, tiny_checkpoints):
    """draft:MODEL with another random model of the same tokenizer (another seed: it agrees with
    the target now and then): greedy and seeded outputs as without speculation."""
    plain, _ = pair
    draft = LLM(str(tiny_checkpoints("qwen3")), dtype="float32", progress=False,
                speculative=f"draft:{tiny_checkpoints('qwen3', seed=1)}")
    ps = prompts(6, seed=8)
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=True)
    want = [numbers(o) for o in plain.generate(ps, greedy)]
    got = [numbers(o) for o in draft.generate(ps, greedy)]
    for (wt, wl), (gt, gl) in zip(want, got):
        assert gt == wt and gl == pytest.approx(wl, abs=1e-4)
    seeded = [SamplingParams(temperature=0.8, seed=i, max_tokens=24, ignore_eos=True) for i in range(len(ps))]
    assert [o.token_ids for o in draft.generate(ps, seeded)] == [o.token_ids for o in plain.generate(ps, seeded)]
    assert draft.engine.spec_stats.draft_tokens > 0


def test_the_model_as_its_own_draft_keeps_its_drafts(tiny_checkpoints):
    """A draft that is the model itself proposes the model's greedy tokens: nearly all kept,
    several tokens a step (its cache catching up on what was kept, across blocks)."""
    folder = str(tiny_checkpoints("qwen3"))
    plain = LLM(folder, dtype="float32", progress=False)
    same = LLM(folder, dtype="float32", progress=False, speculative=f"draft:{folder}")
    ps = prompts(3, seed=9)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    assert [o.token_ids for o in same.generate(ps, params)] == [o.token_ids for o in plain.generate(ps, params)]
    stats = same.engine.spec_stats
    assert stats.acceptance_rate > 0.9 and stats.tokens_per_step > 3, stats


def test_a_draft_model_with_another_tokenizer_is_refused(tmp_path, tiny_checkpoints):
    import shutil

    folder = tiny_checkpoints("qwen3")
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoints("qwen2"), other)
    import json

    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(QwenkitError, match="another tokenizer"):
        LLM(str(folder), dtype="float32", progress=False, speculative=f"draft:{other}")


def test_cli_refuses_a_bad_value_before_loading():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "qwenkit", "run", "--speculative", "ngram:x", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("error: --speculative 'ngram:x'")
    assert "loading" not in run.stderr


def test_default_model_edit_prompt(default_gguf):
    """The embedded coder model rewriting a function: the same tokens with prompt lookup, most
    of them from kept drafts (the function is copied), in fewer steps."""
    import json
    from pathlib import Path

    line = (Path(__file__).parent.parent / "benchmarks/data/speculative_edit.jsonl").read_text().splitlines()[1]
    messages = json.loads(line)["messages"]
    plain = LLM(str(default_gguf), progress=False)
    spec = LLM(str(default_gguf), progress=False, speculative="ngram")
    params = SamplingParams(temperature=0, max_tokens=96)
    want = plain.chat(messages, params)
    got = spec.chat(messages, params)
    assert (got.content, got.usage.completion_tokens) == (want.content, want.usage.completion_tokens)
    stats = spec.engine.spec_stats
    assert stats.accepted_tokens > want.usage.completion_tokens // 3, stats
