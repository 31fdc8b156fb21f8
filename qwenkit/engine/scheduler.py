"""Which sequences compute which tokens in the next step.

Each step has a token budget (`max_num_batched_tokens`). Running sequences go first —
mostly one decode token each — then waiting ones are admitted, their prompts computed
in chunks that fit what is left of the budget (chunked prefill mixed with decode). When
the block pool runs out, the most recently admitted running sequence is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed later
(its generated tokens are kept, so its output does not change).

A running sequence may carry draft tokens (speculative decoding): they are computed after its
last token in the same step, as far as the budget and the block pool allow; drafts that do not
fit are dropped before anything is preempted for them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from qwenkit.engine.block_manager import BlockManager
from qwenkit.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSequence:
    seq: Sequence
    num_tokens: int  # computed this step, from seq.num_computed_tokens on


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[ScheduledSequence]:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        queue = list(self.running)
        self.running = []
        preempted = False
        while queue:
            seq = queue.pop(0)
            if seq.draft_token_ids:
                fits = min(len(seq.draft_token_ids), budget - seq.num_uncomputed_tokens)
                if fits <= 0 or not bm.allocate(seq, len(seq.token_ids) + fits):
                    fits = 0
                del seq.draft_token_ids[max(fits, 0):]
            num_tokens = min(seq.num_uncomputed_tokens + len(seq.draft_token_ids), budget)
            if num_tokens == 0:
                self.running.append(seq)
                continue
            while not bm.allocate(seq, seq.num_computed_tokens + num_tokens):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                scheduled.append(ScheduledSequence(seq, num_tokens))
                self.running.append(seq)
                budget -= num_tokens

        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            bm.match_prefix(seq)
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if not bm.allocate(seq, seq.num_computed_tokens + num_tokens):
                bm.free_sequence(seq)  # do not hold cache blocks while waiting
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, num_tokens))
            budget -= num_tokens
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_sequence(seq)
        seq.draft_token_ids.clear()
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` finished and release its blocks (wherever it is queued)."""
        seq.finish_reason = reason
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.draft_token_ids.clear()
        self.block_manager.free_sequence(seq)
