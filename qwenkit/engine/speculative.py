"""Speculative decoding that changes no output: cheap drafts, checked by the model in one step.

A drafter proposes up to k next tokens for a decoding sequence. The engine computes the
sequence's last token and its k drafts in one step, as k + 1 decode rows (each row attends
over its own context in the paged cache, as a one-token decode step would), then samples
position by position with the sequence's own sampling state: the draft at a position is kept
while the token sampled there equals it, and the first sampled token that differs ends the
step's tokens. So each token emitted is drawn exactly as it would be without speculation (the
same logits processing, the same one uniform number from the sequence's generator), and the
output is the model's own: greedy tokens the same, sampled ones from the same distribution
(for a drafter that proposes one token a position this is rejection sampling with a point-mass
draft: keep the draft d with probability p(d), else draw from p without d); with deterministic
steps, tokens and logprobs are bit for bit those of the request without speculation.

The drafter here is prompt lookup (vLLM's `ngram`, llama.cpp's lookup decoding): the last n
tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`) are looked up among the earlier
tokens of the prompt and output, and what followed their latest earlier occurrence is the
draft. It needs no weights and pays where outputs copy their input (code edits, quoting a
document). How many drafts a sequence gets adapts to what it has accepted lately, and a
sequence whose drafts keep failing stops drafting for a while (`DraftState`), so that text
with nothing to copy decodes as fast as without speculation.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwenkit.errors import QwenkitError

METHODS = ("ngram", "off")


@dataclass(frozen=True)
class SpeculativeConfig:
    """method: "ngram" (prompt lookup) or "off". num_speculative_tokens: the most drafts a
    sequence gets in one step. prompt_lookup_min/max: the n-gram sizes looked up. max_rows: a
    step's decode rows (sequences plus drafts) past which no more drafts are added: beyond it
    a step is bound by compute, where checking drafts costs what they save."""

    method: str = "ngram"
    num_speculative_tokens: int = 8
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    max_rows: int = 32

    def __post_init__(self):
        if self.method not in METHODS:
            raise QwenkitError(f"unknown speculative method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.num_speculative_tokens < 1:
            raise QwenkitError(f"num_speculative_tokens must be at least 1, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise QwenkitError("prompt lookup n-gram sizes need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                               f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")

    @property
    def enabled(self) -> bool:
        return self.method != "off"

    @classmethod
    def parse(cls, value: "str | SpeculativeConfig | None") -> "SpeculativeConfig":
        """`--speculative`'s value: "ngram", "ngram:K" (at most K drafts a step) or "off"
        (None: off). A draft model ("draft:MODEL") and EAGLE-3 heads ("eagle:PATH") are named
        with a clear error: they are not built."""
        if value is None:
            return cls(method="off")
        if isinstance(value, SpeculativeConfig):
            return value
        method, _, arg = str(value).strip().partition(":")
        if method in ("draft", "eagle"):
            raise QwenkitError(f"--speculative {value}: {'a draft model' if method == 'draft' else 'EAGLE-3 heads'} "
                               "cannot be used yet; prompt lookup (--speculative ngram) needs no extra weights")
        if method == "off" and not arg:
            return cls(method="off")
        if method != "ngram":
            raise QwenkitError(f"--speculative {value!r}: choose ngram, ngram:K (at most K drafts a step) or off")
        if not arg:
            return cls()
        if not arg.isdigit() or int(arg) < 1:
            raise QwenkitError(f"--speculative {value!r}: K in ngram:K is a whole number of drafts, at least 1")
        return cls(num_speculative_tokens=int(arg))


class NgramIndex:
    """The latest end of every n-gram (n in [n_min, n_max]) among a sequence's tokens,
    extended as tokens are added: a lookup costs one dict access per n."""

    def __init__(self, n_min: int, n_max: int):
        self.sizes = range(n_max, n_min - 1, -1)  # longest first
        self.ends: list[dict[tuple[int, ...], int]] = [{} for _ in self.sizes]
        self.indexed = 0  # n-grams ending before this position are in `ends`

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix
        of `tokens` found (none if no suffix of n_min tokens occurred before)."""
        length = len(tokens)
        for end in range(self.indexed + 1, length):  # n-grams ending at end (exclusive), end < length
            for n, ends in zip(self.sizes, self.ends):
                if end >= n:
                    ends[tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, length - 1)
        for n, ends in zip(self.sizes, self.ends):
            if length <= n:
                continue
            start = ends.get(tuple(tokens[length - n :]))
            if start is not None:
                return tokens[start : start + k]
        return []


class DraftState:
    """One sequence's drafting: its n-gram index, how many drafts to propose next (doubled
    after a step that kept them all, else one more than it kept), and a back-off after steps
    that kept none (1, 2, 4 ... 32 steps without drafts)."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.index = NgramIndex(config.prompt_lookup_min, config.prompt_lookup_max)
        self.k = min(2, config.num_speculative_tokens)
        self.skip = 0
        self.misses = 0

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        if self.skip > 0:
            self.skip -= 1
            return []
        k = min(self.k, limit)
        return self.index.propose(tokens, k) if k > 0 else []

    def feedback(self, proposed: int, accepted: int) -> None:
        if accepted == proposed:
            self.k = min(2 * self.k, self.config.num_speculative_tokens)
        else:
            self.k = max(1, min(accepted + 1, self.config.num_speculative_tokens))
        if accepted == 0:
            self.misses += 1
            self.skip = min(1 << (self.misses - 1), 32)
        else:
            self.misses = 0


@dataclass
class SpeculativeStats:
    """Totals since the engine started: decode steps of sequences that had drafts, the drafts
    proposed and kept, and the tokens those steps emitted."""

    verify_steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    emitted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens a sequence got per step where it had drafts (1.0 without speculation)."""
        return self.emitted_tokens / self.verify_steps if self.verify_steps else 0.0
