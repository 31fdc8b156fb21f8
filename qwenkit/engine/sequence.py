"""One sequence being generated: its tokens, how many are in the KV cache, its blocks."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """Tokens of one completion: the prompt, then every generated (or forced) token.

    `num_computed_tokens` of them have their keys and values in the cache; the rest are
    computed by the next steps (a whole prompt, a chunk of it, or one new token).
    """

    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]
    num_prompt_tokens: int
    max_tokens: int  # generated tokens allowed (max_tokens, capped by the context)
    # Per-request helpers owned by the engine (sampling state, detokenizer, controls).
    state: Any = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    # Speculative tokens to check in the next step, after the last token (engine/speculative.py):
    # not part of token_ids until the step keeps them.
    draft_token_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0  # times its blocks were taken back (its cache recomputed since)
    # A prompt with images (qwenkit.multimodal.MultimodalPrompt): their embeddings, M-RoPE positions, hashes.
    multimodal: Any = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
