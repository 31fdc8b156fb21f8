"""Sampling parameters and the sampler: temperature, top-k, top-p, seeded generators.

A parameter left as None is taken from the checkpoint's generation_config.json when the
request starts (`SamplingParams.resolved`), else from the neutral default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from qwenkit.config import GenerationConfig


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, and when to stop.

    temperature: 0 means greedy (argmax); None takes generation_config's value, else 1.0.
    top_p: nucleus sampling mass in (0, 1]; top_k: keep the k likeliest (0 or -1: all).
    max_tokens: how many tokens to generate at most (None: until the context is full).
    seed: makes sampling reproducible for this request alone.
    stop: strings that end generation; the match is not part of the returned text.
    stop_token_ids: extra token ids that end generation (the end-of-turn ids always do,
    unless ignore_eos).
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = 16
    seed: int | None = None
    stop: tuple[str, ...] | str | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    _resolved: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
        if self.temperature is not None and not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (self.top_k < -1 or int(self.top_k) != self.top_k):
            raise ValueError(f"top_k must be -1, 0 (no limit) or a positive integer, got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    def resolved(
        self, generation_config: GenerationConfig, fallback: "SamplingDefaults | None" = None
    ) -> "SamplingParams":
        """Fill the parameters left as None: generation_config.json first, then `fallback`
        (chat uses Qwen3's recommended values for the mode), then the neutral defaults."""
        if self._resolved:
            return self
        g = generation_config
        f = fallback or NEUTRAL
        temperature = _first(self.temperature, g.temperature, f.temperature)
        if g.do_sample is False and self.temperature is None:
            temperature = 0.0
        return dataclasses.replace(
            self,
            temperature=temperature,
            top_p=_first(self.top_p, g.top_p, f.top_p),
            top_k=_first(self.top_k, g.top_k, f.top_k),
            _resolved=True,
        )


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float
    top_p: float
    top_k: int


NEUTRAL = SamplingDefaults(temperature=1.0, top_p=1.0, top_k=0)
# The Qwen3 model cards' recommended settings for each mode.
QWEN3_THINKING = SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20)
QWEN3_NON_THINKING = SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20)


def _first(*values):
    return next(v for v in values if v is not None)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A per-request generator, so a seeded request's output does not depend on anything else."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick one token from float32 logits [vocab] with resolved `params`."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k and params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
