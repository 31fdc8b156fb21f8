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

Two drafters:
- prompt lookup ("ngram"; vLLM's `ngram`, llama.cpp's lookup decoding): the last n tokens (n
  from `prompt_lookup_max` down to `prompt_lookup_min`) are looked up among the earlier tokens
  of the prompt and output, and what followed their latest earlier occurrence is the draft. It
  needs no weights and pays where outputs copy their input (code edits, quoting a document).
- a draft model ("draft:MODEL"): a smaller model with the same tokenizer (Qwen3-0.6B for
  Qwen3-8B) proposes its greedy tokens. It has its own KV cache, indexed by the target's block
  tables (a position's slot is the same in both caches), and catches up on the tokens the
  target kept before each proposal (`DraftModelProposer`).
How many drafts a sequence gets follows from the share of its recent drafts that were kept
and from the batch's size (a draft row is worth less in a bigger step: `draft_threshold`), and
a sequence whose drafts keep failing stops drafting for a while (`DraftState`), so that text
where drafts miss decodes about as fast as without speculation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING


from qwenkit.errors import QwenkitError

if TYPE_CHECKING:
    from qwenkit.engine.model_runner import ModelRunner
    from qwenkit.engine.sequence import Sequence

METHODS = ("ngram", "draft", "off")


@dataclass(frozen=True)
class SpeculativeConfig:
    """method: "ngram" (prompt lookup), "draft" (draft_model: a model name or path, as `LLM`
    takes one) or "off". num_speculative_tokens: the most drafts a sequence gets in one step. prompt_lookup_min/max: the n-gram sizes looked up. max_rows: a
    step's decode rows (sequences plus drafts) past which no more drafts are added: beyond it
    a step is bound by compute, where checking drafts costs what they save."""

    method: str = "ngram"
    num_speculative_tokens: int = 8
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    max_rows: int = 32
    draft_model: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise QwenkitError(f"unknown speculative method {self.method!r}; choose one of {', '.join(METHODS)}")
        if (self.method == "draft") != bool(self.draft_model):
            raise QwenkitError("a draft model is named with method 'draft' (--speculative draft:MODEL), and only there")
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
        """`--speculative`'s value: "ngram", "ngram:K" (at most K drafts a step), "draft:MODEL"
        (a draft model: a name, folder or file as `LLM` takes) or "off" (None: off). EAGLE-3
        heads ("eagle:PATH") are named with a clear error: they are not built."""
        if value is None:
            return cls(method="off")
        if isinstance(value, SpeculativeConfig):
            return value
        method, _, arg = str(value).strip().partition(":")
        if method == "draft":
            if not arg:
                raise QwenkitError("--speculative draft:MODEL names the draft model (e.g. draft:qwen3:0.6b)")
            return cls(method="draft", draft_model=arg, num_speculative_tokens=4)
        if method == "eagle":
            raise QwenkitError(f"--speculative {value}: EAGLE-3 heads cannot be used yet; use ngram (prompt lookup, "
                               "no extra weights) or draft:MODEL (a smaller model with the same tokenizer)")
        if method == "off" and not arg:
            return cls(method="off")
        if method != "ngram":
            raise QwenkitError(f"--speculative {value!r}: choose ngram, ngram:K (at most K drafts a step), "
                               "draft:MODEL or off")
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


def draft_threshold(num_running: int) -> float:
    """The least chance a draft should have of being kept to be worth its row, with
    `num_running` sequences in the step. A draft row costs a share of a step that grows with
    the batch: on the 2-core AVX-512 EPYC of docs/speculative.md a row adds ~17% to a one-row
    decode step, but ~35% of a token's share of an 8-row step; past ~32 rows nothing pays."""
    return min(1.0, 0.15 + 0.025 * num_running)


class DraftState:
    """One sequence's drafting: the chance that its next draft is kept (the kept drafts over
    the kept ones and the rejections of its recent steps, a short memory), from which the
    number of drafts worth proposing follows (`next_k`); a back-off after steps that kept none
    (1, 2, 4 ... 32 steps without drafts); and the drafter's own state: the n-gram index, or
    how many of the sequence's tokens the draft model's cache holds."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.index = NgramIndex(config.prompt_lookup_min, config.prompt_lookup_max)
        self.kept = 1.0  # a prior of one kept draft and one rejection: a chance of 1/2
        self.rejected = 1.0
        self.skip = 0
        self.misses = 0
        self.draft_computed = 0  # the draft model's cache: tokens computed (positions 0..n-1)
        self.draft_preemptions = 0  # the sequence's preemptions when that count was right

    def next_k(self, limit: int, threshold: float = 0.2) -> int:
        """How many drafts to propose this step: the k-th draft is kept with chance p**k (p
        the chance of one), so as many as keep that above `threshold`, at least one (or none
        while backing off), at most `limit` and num_speculative_tokens."""
        if self.skip > 0:
            self.skip -= 1
            return 0
        p = self.kept / (self.kept + self.rejected)
        k = self.config.num_speculative_tokens if p >= 0.999 else int(math.log(threshold) / math.log(p))
        return max(0, min(max(k, 1), limit, self.config.num_speculative_tokens))

    def propose(self, tokens: list[int], limit: int, threshold: float = 0.2) -> list[int]:
        """Prompt lookup's drafts."""
        k = self.next_k(limit, threshold)
        return self.index.propose(tokens, k) if k > 0 else []

    def feedback(self, proposed: int, accepted: int) -> None:
        self.kept = 0.7 * self.kept + accepted
        self.rejected = 0.7 * self.rejected + (accepted < proposed)
        if accepted == 0:
            self.misses += 1
            self.skip = min(1 << (self.misses - 1), 32)
        else:
            self.misses = 0


class DraftModelProposer:
    """A draft model's greedy tokens, for several sequences at once. `runner` is the draft
    model's own ModelRunner, its cache as many blocks as the target's: it is indexed by the
    target's block tables. A proposal first computes, in one step, every token a sequence kept
    since the draft last saw it (its whole prompt the first time) and takes the draft's next
    token, then one decode step per further draft."""

    def __init__(self, runner: "ModelRunner", vocab_size: int):
        self.runner = runner
        self.vocab_size = vocab_size  # the target's: a draft token is always one the target has

    def propose(self, seqs: list["Sequence"], ks: list[int]) -> list[list[int]]:
        """Drafts for `seqs` (each holding blocks for its tokens plus ks[i]), ks[i] >= 1 each."""
        from qwenkit.engine.model_runner import StepInput

        states: list[DraftState] = []
        for seq in seqs:
            st = seq.state.draft
            if st.draft_preemptions != seq.num_preemptions:  # its blocks are new: the draft's cache is gone
                st.draft_computed, st.draft_preemptions = 0, seq.num_preemptions
            states.append(st)
        step = StepInput(
            token_ids=[seq.token_ids[st.draft_computed:] for seq, st in zip(seqs, states)],
            starts=[st.draft_computed for st in states],
            block_tables=[seq.block_table for seq in seqs],
            samples=[True] * len(seqs),
        )
        drafts = [[t] for t in self._greedy(step)]
        for seq, st in zip(seqs, states):
            st.draft_computed = len(seq.token_ids)
        active = [i for i, k in enumerate(ks) if k > 1]
        while active:
            step = StepInput(
                token_ids=[[drafts[i][-1]] for i in active],
                starts=[len(seqs[i].token_ids) + len(drafts[i]) - 1 for i in active],
                block_tables=[seqs[i].block_table for i in active],
                samples=[True] * len(active),
            )
            for i, t in zip(active, self._greedy(step)):
                drafts[i].append(t)
            active = [i for i in active if len(drafts[i]) < ks[i]]
        return drafts

    def _greedy(self, step) -> list[int]:
        _, logits = self.runner.execute(step)
        return logits[:, : self.vocab_size].argmax(dim=-1).tolist()

    @staticmethod
    def kept(state: DraftState, length: int, proposed: int, kept: int) -> None:
        """After the target checked the drafts of a sequence that had `length` tokens: the
        draft's cache holds its tokens and the kept drafts it computed (all but the last)."""
        state.draft_computed = length + min(kept, proposed - 1)


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
