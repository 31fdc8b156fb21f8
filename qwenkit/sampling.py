"""Sampling parameters: how each next token is picked, and when generation stops.

A parameter left as None is taken from the checkpoint's generation_config.json when the
request starts (`SamplingParams.resolved`), else from the fallback (Qwen3's recommended
values in chat), else from the neutral default. The batched sampler that applies them is
`qwenkit.engine.sampler`.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field

from qwenkit.config import GenerationConfig
from qwenkit.sampling_fields import BY_NAME as FIELDS_BY_NAME
from qwenkit.sampling_fields import FIELDS, MAX_LOGIT_BIAS, MODEL_DEFAULTS


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick each next token, and when to stop.

    The logits are processed in this order (see `qwenkit.engine.sampler`):
    logit_bias, min_tokens, repetition_penalty, frequency/presence penalties,
    temperature, top_k, top_p, min_p.

    The ranges are the table's (qwenkit/sampling_fields.py), the same on every surface.
    temperature: 0 means greedy (argmax), at most 2; None takes generation_config's value, else 1.0.
    top_p: nucleus sampling mass in (0, 1]; top_k: keep the k likeliest (0 or -1: all).
    min_p: drop tokens whose probability is below min_p times the likeliest's, in [0, 1].
    repetition_penalty: > 0, over the prompt and the generated tokens (Hugging Face
    semantics: a positive logit is divided by it, a negative one multiplied); 1 is off.
    presence_penalty, frequency_penalty: in [-2, 2], over the generated tokens (OpenAI
    semantics: logit -= presence * (count > 0) + frequency * count).
    logit_bias: token id -> bias in [-100, 100] added to its logit (-100 bans it in
    practice, +100 forces it). Keys may be strings of ints, as OpenAI's JSON sends them;
    stored as a tuple of (id, bias) pairs sorted by id, so the params stay hashable.
    n: how many completions to generate, 1..MAX_N.
    max_tokens: how many tokens to generate at most (None: until the context is full).
    min_tokens: the end-of-turn ids and stop_token_ids cannot be sampled before this
    many tokens are generated (stop strings still apply).
    seed: makes sampling reproducible for this request alone.
    stop: strings that end generation; the match is not part of the returned text.
    stop_token_ids: extra token ids that end generation (the end-of-turn ids always do,
    unless ignore_eos).
    logprobs: report the chosen token's logprob (of the model's raw distribution, before
    any of the processing above, as OpenAI and vLLM do).
    top_logprobs: also report the k likeliest tokens with their logprobs, 0..20; needs
    logprobs=True (as OpenAI's chat API requires), else ValueError.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] | Mapping[int | str, float] | None = None
    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    seed: int | None = None
    stop: tuple[str, ...] | str | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    _resolved: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(_token_id("stop_token_ids", i) for i in self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        for row in _TABLE_ROWS:
            value = getattr(self, row.name)
            if value is not None:
                object.__setattr__(self, row.name, row.check(value))
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.top_logprobs and not self.logprobs:
            raise ValueError(f"top_logprobs={self.top_logprobs} needs logprobs=True")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    def resolved(
        self, generation_config: GenerationConfig, fallback: "SamplingDefaults | None" = None
    ) -> "SamplingParams":
        """Fill the parameters left as None: generation_config.json first, then `fallback`
        (chat uses Qwen3's recommended values for the mode), then the neutral defaults."""
        if self._resolved:
            return self
        mode = fallback.values if fallback else {}
        values = {row.name: _first(getattr(self, row.name), generation_config.sampling.get(row.name),
                                   mode.get(row.name), row.default) for row in MODEL_DEFAULTS}
        if generation_config.do_sample is False and self.temperature is None:
            values["temperature"] = 0.0
        return dataclasses.replace(self, **values, _resolved=True)

    def check_token_ids(self, vocab_size: int) -> None:
        """ValueError naming the field if logit_bias or stop_token_ids holds an id >= vocab_size."""
        for name, ids in (("logit_bias", [i for i, _ in self.logit_bias]), ("stop_token_ids", self.stop_token_ids)):
            bad = [i for i in ids if i >= vocab_size]
            if bad:
                raise ValueError(f"{name} holds token id {bad[0]}, but the vocabulary has {vocab_size} tokens")


# The table's rows that are SamplingParams fields, each checked by its row.
_TABLE_ROWS = tuple(row for row in FIELDS if row.name in {f.name for f in dataclasses.fields(SamplingParams)})


@dataclass(frozen=True)
class SamplingDefaults:
    """Values a request's unset model-default fields (`sampling_fields.MODEL_DEFAULTS`) take
    when generation_config.json gives none: a chat mode's recommended ones. A field not
    named here takes its row's neutral default."""

    values: Mapping[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        names = {row.name for row in MODEL_DEFAULTS}
        for name, value in self.values.items():
            if name not in names:
                raise ValueError(f"{name} has no model default; one of {', '.join(sorted(names))}")
            FIELDS_BY_NAME[name].check(value)


# The Qwen3 model cards' recommended settings for each mode.
QWEN3_THINKING = SamplingDefaults({"temperature": 0.6, "top_p": 0.95, "top_k": 20})
QWEN3_NON_THINKING = SamplingDefaults({"temperature": 0.7, "top_p": 0.8, "top_k": 20})


def _first(*values):
    return next(v for v in values if v is not None)


def _token_id(name: str, value) -> int:
    """A token id from an int or a string of one (JSON object keys are strings)."""
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"{name} keys must be token ids, got {value!r}") from None
    try:
        token_id = operator.index(value)
    except TypeError:
        token_id = -1
    if token_id < 0 or isinstance(value, bool):
        raise ValueError(f"{name} must hold token ids (integers >= 0), got {value!r}")
    return token_id


def _logit_bias(value) -> tuple[tuple[int, float], ...]:
    if not value:
        return ()
    pairs = value.items() if isinstance(value, Mapping) else value
    bias: dict[int, float] = {}
    for key, b in pairs:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {b!r} for token {key!r}")
        bias[_token_id("logit_bias", key)] = float(b)
    return tuple(sorted(bias.items()))
