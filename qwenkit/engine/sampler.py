"""Batched sampling: one step's logits [B, V] and each row's SamplingState -> one token a row.

Each row's logits are processed in this order:
1. `allowed` (a grammar's mask): disallowed tokens get -inf, before anything else.
2. logit_bias is added.
3. min_tokens: while fewer than min_tokens tokens are generated, the end-of-turn ids
   (unless ignore_eos) and stop_token_ids get -inf, unless that would leave no token
   allowed (then the grammar wins).
4. repetition_penalty over the prompt and the generated tokens, then frequency_penalty
   and presence_penalty over the generated tokens (vLLM's order).
5. temperature; 0 is greedy: the argmax of the logits so far, and no randomness is drawn.
6. top_k, 7. top_p, 8. min_p, 9. one uniform number from the row's own generator picks
   the token (inverse CDF).

The processing is vectorised over the batch and row-wise, and the only randomness is the
row's own generator, so a request's tokens never depend on what else is in the batch.
Logprobs are those of the raw logits, before any processing (as OpenAI and vLLM report).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from qwenkit.sampling import SamplingParams

_RESOLVED_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
)
_NEG_INF = float("-inf")
# Rows with top_p but no top_k first try their best this many tokens (exact when those
# hold top_p of the mass), to spare a sort of the whole vocabulary.
_TOP_P_CANDIDATES = 1024


@dataclass(eq=False)
class SamplingState:
    """What sampling needs to know about one sequence; lives as long as the sequence."""

    params: SamplingParams  # resolved: no None left
    # Seeded from params.seed, else from a fresh random seed: every row has its own stream.
    # On the CPU whatever the device: a row's one draw a step is a few nanoseconds there,
    # where a CUDA generator would launch a kernel per row; a seed gives the same stream
    # on every device.
    generator: torch.Generator
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)  # the engine appends each token
    eos_token_ids: frozenset[int] = frozenset()  # end-of-turn ids, held back until min_tokens
    _prompt_ids: torch.Tensor | None = field(default=None, repr=False)  # unique prompt ids
    _output_ids: torch.Tensor | None = field(default=None, repr=False)  # output_token_ids so far

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_token_ids: list[int],
        eos_token_ids: frozenset[int],
        device: torch.device | str,
    ) -> "SamplingState":
        unset = [name for name in _RESOLVED_FIELDS if getattr(params, name) is None]
        if unset:
            raise ValueError(f"SamplingParams must be resolved first (.resolved()); unset: {', '.join(unset)}")
        generator = torch.Generator()
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        return cls(params, generator, list(prompt_token_ids), [], frozenset(eos_token_ids))

    @property
    def suppressed_token_ids(self) -> frozenset[int]:
        """The ids that may not be sampled now: the stop ids, until min_tokens are generated."""
        if len(self.output_token_ids) >= self.params.min_tokens:
            return frozenset()
        eos = frozenset() if self.params.ignore_eos else self.eos_token_ids
        return eos | frozenset(self.params.stop_token_ids)

    def unique_prompt_ids(self, device: torch.device) -> torch.Tensor:
        if self._prompt_ids is None or self._prompt_ids.device != device:
            self._prompt_ids = _ids(sorted(set(self.prompt_token_ids)), device)
        return self._prompt_ids

    def output_ids(self, device: torch.device) -> torch.Tensor:
        """output_token_ids as a tensor, extended by the tokens appended since the last call."""
        cached, n = self._output_ids, len(self.output_token_ids)
        if cached is None or cached.device != device or cached.numel() > n:
            cached = _ids(self.output_token_ids, device)
        elif cached.numel() < n:
            cached = torch.cat([cached, _ids(self.output_token_ids[cached.numel() :], device)])
        self._output_ids = cached
        return cached


@dataclass
class SampleOutput:
    token_id: int
    logprob: float | None  # of the chosen token, in the raw distribution (when params.logprobs)
    # The params.top_logprobs likeliest (id, logprob), best first ([] when top_logprobs=0).
    top_logprobs: list[tuple[int, float]] | None


class Sampler:
    """Picks one token for each row of a step's logits."""

    def __call__(
        self,
        logits: torch.Tensor,
        states: list[SamplingState],
        *,
        allowed: list[torch.Tensor | None] | None = None,
    ) -> list[SampleOutput]:
        """`logits`: [B, V] (V may exceed the tokenizer's vocabulary); `states[i]` and
        `allowed[i]` (a bool mask [<= V] from a grammar; ids past its end are disallowed)
        belong to row i. `logits` is not modified."""
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits must be [{len(states)}, vocab], got {list(logits.shape)}")
        needs_copy = (allowed is not None and any(m is not None for m in allowed)) or any(map(_edits_logits, states))
        x = logits.to(torch.float32, copy=needs_copy)
        _apply_allowed(x, allowed)
        _apply_logit_bias(x, states)
        _suppress_stop_tokens(x, states)
        _apply_penalties(x, states)

        tokens = torch.empty(len(states), dtype=torch.long, device=x.device)
        greedy = [i for i, s in enumerate(states) if s.params.temperature == 0]
        sampled = [i for i, s in enumerate(states) if s.params.temperature != 0]
        if greedy:
            tokens[greedy] = _rows(x, greedy).argmax(-1)
        if sampled:
            tokens[sampled] = _sample(_rows(x, sampled), [states[i] for i in sampled])
        return _outputs(logits, tokens.tolist(), states)


def _edits_logits(s: SamplingState) -> bool:
    """Whether steps 2-4 change this row's logits (else they are read, not copied)."""
    p = s.params
    return bool(
        p.logit_bias or s.suppressed_token_ids or p.repetition_penalty != 1
        or ((p.frequency_penalty or p.presence_penalty) and s.output_token_ids)
    )


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows], without a copy when that is every row."""
    return x if len(rows) == x.shape[0] else x[rows]


def _apply_allowed(x: torch.Tensor, allowed: list[torch.Tensor | None] | None) -> None:
    if allowed is None:
        return
    if len(allowed) != x.shape[0]:
        raise ValueError(f"allowed has {len(allowed)} masks for {x.shape[0]} rows")
    rows = [i for i, mask in enumerate(allowed) if mask is not None]
    if not rows:
        return
    vocab = x.shape[1]
    masks = torch.zeros(len(rows), vocab, dtype=torch.bool, device=x.device)
    for j, i in enumerate(rows):
        mask = allowed[i]
        if mask.dim() != 1 or mask.shape[0] > vocab:
            raise ValueError(f"allowed[{i}] must be a bool mask of at most {vocab} entries, got {list(mask.shape)}")
        masks[j, : mask.shape[0]] = mask
    empty = (~masks.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"allowed[{rows[empty[0]]}] allows no token")
    x[rows] = _rows(x, rows).masked_fill(~masks, _NEG_INF)


def _apply_logit_bias(x: torch.Tensor, states: list[SamplingState]) -> None:
    rows, ids, biases = [], [], []
    for i, s in enumerate(states):
        for token_id, bias in s.params.logit_bias:
            rows.append(i)
            ids.append(token_id)
            biases.append(bias)
    if not rows:
        return
    if max(ids) >= x.shape[1]:
        raise ValueError(f"logit_bias token id {max(ids)} is outside the vocabulary ({x.shape[1]} tokens)")
    index = (torch.tensor(rows, device=x.device), torch.tensor(ids, device=x.device))
    x.index_put_(index, torch.tensor(biases, dtype=x.dtype, device=x.device), accumulate=True)


def _suppress_stop_tokens(x: torch.Tensor, states: list[SamplingState]) -> None:
    """min_tokens: the stop ids get -inf, except in rows where nothing else is allowed."""
    vocab = x.shape[1]
    rows, ids = [], []
    for i, s in enumerate(states):
        for token_id in s.suppressed_token_ids:
            if token_id < vocab:
                rows.append(i)
                ids.append(token_id)
    if not rows:
        return
    r = torch.tensor(rows, device=x.device)
    c = torch.tensor(ids, device=x.device)
    saved = x[r, c]
    x[r, c] = _NEG_INF
    affected = sorted(set(rows))
    dead = (_rows(x, affected) == _NEG_INF).all(-1).nonzero().flatten().tolist()
    if dead:  # a grammar that allows only stop tokens wins over min_tokens
        restore = torch.isin(r, torch.tensor([affected[j] for j in dead], device=x.device))
        x[r[restore], c[restore]] = saved[restore]


def _apply_penalties(x: torch.Tensor, states: list[SamplingState]) -> None:
    vocab = x.shape[1]
    device = x.device

    rows = [i for i, s in enumerate(states) if s.params.repetition_penalty != 1]
    if rows:
        seen = [torch.cat([states[i].unique_prompt_ids(device), states[i].output_ids(device)]) for i in rows]
        keys = _keys(rows, seen, vocab).unique_consecutive()  # each (row, id) once
        r, c = keys // vocab, keys % vocab
        penalty = torch.tensor([s.params.repetition_penalty for s in states], device=device)[r]
        values = x[r, c]
        x[r, c] = torch.where(values > 0, values / penalty, values * penalty)

    rows = [
        i for i, s in enumerate(states)
        if (s.params.frequency_penalty or s.params.presence_penalty) and s.output_token_ids
    ]
    if rows:
        keys, counts = _keys(rows, [states[i].output_ids(device) for i in rows], vocab).unique_consecutive(
            return_counts=True
        )
        r, c = keys // vocab, keys % vocab
        frequency = torch.tensor([s.params.frequency_penalty for s in states], device=device)[r]
        presence = torch.tensor([s.params.presence_penalty for s in states], device=device)[r]
        x.index_put_((r, c), -(frequency * counts.to(x.dtype) + presence), accumulate=True)


def _keys(rows: list[int], ids: list[torch.Tensor], vocab: int) -> torch.Tensor:
    """Sorted keys row * vocab + id, so one pass over them serves the whole batch."""
    return torch.cat([i * vocab + t for i, t in zip(rows, ids)]).sort().values


def _ids(token_ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(token_ids, dtype=torch.long, device=device)


def _sample(x: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Token ids [b] drawn from processed logits [b, V] with temperature > 0."""
    num_rows, vocab = x.shape
    params = [s.params for s in states]
    x = x / torch.tensor([p.temperature for p in params], device=x.device)[:, None]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    # Rows with top_k draw among their k best; rows with only top_p among their best
    # _TOP_P_CANDIDATES when those reach top_p, else after a full sort; the rest draw
    # from the whole vocabulary, unsorted.
    with_top_k = [j for j in range(num_rows) if top_k[j]]
    top_p_only = [j for j in range(num_rows) if not top_k[j] and params[j].top_p < 1]
    whole = [j for j in range(num_rows) if not top_k[j] and params[j].top_p >= 1]
    tokens = torch.empty(num_rows, dtype=torch.long, device=x.device)
    if with_top_k:
        values, ids = _rows(x, with_top_k).topk(max(top_k[j] for j in with_top_k), dim=-1)
        k = torch.tensor([top_k[j] for j in with_top_k], device=x.device)
        values.masked_fill_(torch.arange(values.shape[1], device=x.device) >= k[:, None], _NEG_INF)
        tokens[with_top_k] = _draw(values, ids, [states[j] for j in with_top_k])
    if top_p_only:
        rows = _rows(x, top_p_only)
        values, ids = rows.topk(min(vocab, _TOP_P_CANDIDATES), dim=-1)
        log_norm = rows.logsumexp(-1, keepdim=True)
        top_p = torch.tensor([params[j].top_p for j in top_p_only], device=x.device)
        # The nucleus lies among the candidates when their mass reaches top_p.
        enough = ((values - log_norm).exp().sum(-1) >= top_p).tolist()
        if values.shape[1] == vocab:
            enough = [True] * len(enough)
        inside = [j for j, ok in enumerate(enough) if ok]
        outside = [j for j, ok in enumerate(enough) if not ok]
        if inside:
            tokens[[top_p_only[j] for j in inside]] = _draw(
                _rows(values, inside), _rows(ids, inside), [states[top_p_only[j]] for j in inside],
                log_norm=_rows(log_norm, inside),
            )
        if outside:
            values, ids = _rows(rows, outside).sort(dim=-1, descending=True)
            tokens[[top_p_only[j] for j in outside]] = _draw(values, ids, [states[top_p_only[j]] for j in outside])
    if whole:
        tokens[whole] = _draw(_rows(x, whole), None, [states[j] for j in whole])
    return tokens


def _draw(
    values: torch.Tensor,
    ids: torch.Tensor | None,
    states: list[SamplingState],
    *,
    log_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply top_p and min_p to candidate logits [b, K] and draw one token a row.

    The candidates are sorted descending wherever top_p < 1; `ids` [b, K] maps them to
    token ids (None: they are the whole vocabulary); `log_norm` [b, 1] is the logsumexp
    of the whole row when the candidates are only part of it (None: they are all of it).
    """
    params = [s.params for s in states]
    device = values.device
    probs = values.softmax(-1) if log_norm is None else (values - log_norm).exp()
    if any(p.top_p < 1 for p in params):
        top_p = torch.tensor([p.top_p if p.top_p < 1 else float("inf") for p in params], device=device)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        probs.masked_fill_(probs.cumsum(-1) - probs >= top_p[:, None], 0.0)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)
        probs.masked_fill_(probs < min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)

    # One uniform number from each row's own generator: the batch-independence guarantee.
    u = torch.stack([torch.rand((), generator=s.generator, dtype=torch.float64) for s in states]).to(device)
    pos = _inverse_cdf(probs, u)
    return (pos if ids is None else ids.gather(-1, pos))[:, 0]


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The positions [b, 1] where u [b] in [0, 1) falls in the cumulative sums of the
    unnormalised probs [b, K]: first which block of `block` entries (float32 block sums,
    float64 running sum), then where inside that block (float64), so a long row needs no
    float64 copy and keeps float64 accuracy."""
    num_rows, size = probs.shape
    block = min(size & -size, 256)  # the largest power of two dividing size, at most 256
    blocks = probs.contiguous().view(num_rows, size // block, block)
    block_cdf = blocks.sum(-1).to(torch.float64).cumsum(-1)  # [b, K / block]
    target = (u * block_cdf[:, -1])[:, None]
    b = torch.searchsorted(block_cdf, target, right=True).clamp_max_(block_cdf.shape[1] - 1)
    before = torch.where(b > 0, block_cdf.gather(-1, (b - 1).clamp_min(0)), 0.0)
    inner_cdf = blocks[torch.arange(num_rows, device=probs.device), b[:, 0]].to(torch.float64).cumsum(-1)
    pos = b * block + torch.searchsorted(inner_cdf, target - before, right=True).clamp_max_(block - 1)
    # Rounding can land on a token without probability at a block's end: take the likeliest then.
    return torch.where(probs.gather(-1, pos) > 0, pos, probs.argmax(-1, keepdim=True))


def _outputs(logits: torch.Tensor, token_ids: list[int], states: list[SamplingState]) -> list[SampleOutput]:
    outputs = [SampleOutput(t, None, None) for t in token_ids]
    rows = [i for i, s in enumerate(states) if s.params.logprobs]
    if not rows:
        return outputs
    logprobs = _rows(logits, rows).float().log_softmax(-1)
    chosen = torch.tensor([token_ids[i] for i in rows], device=logits.device)[:, None]
    chosen_logprobs = logprobs.gather(-1, chosen)[:, 0].tolist()
    k = max(states[i].params.top_logprobs for i in rows)
    if k:
        top_values, top_ids = logprobs.topk(k, dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        outputs[i].logprob = chosen_logprobs[j]
        n = states[i].params.top_logprobs
        outputs[i].top_logprobs = list(zip(top_ids[j][:n], top_values[j][:n])) if n else []
    return outputs


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    *,
    prompt_token_ids: Iterable[int] = (),
    output_token_ids: Iterable[int] = (),
) -> int:
    """Pick one token from float32 logits [vocab] with resolved `params` (no generator: a
    fresh random one). The penalties see only the token ids passed here."""
    if generator is None:
        generator = torch.Generator(device=logits.device)
        generator.seed()
    state = SamplingState(params, generator, list(prompt_token_ids), list(output_token_ids), frozenset())
    return Sampler()(logits[None], [state])[0].token_id
