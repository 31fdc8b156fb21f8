"""Runs one scheduled step on the model: builds the flattened batch and its paged
attention metadata, and returns the logits of the sequences that sample a token."""

from __future__ import annotations

import torch

from qwenkit.engine.scheduler import ScheduledSequence
from qwenkit.models import QwenForCausalLM
from qwenkit.models.attention import AttentionMetadata, DecodeMetadata


def kv_bytes_per_token(model: QwenForCausalLM) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * model.dtype.itemsize


class ModelRunner:
    def __init__(self, model: QwenForCausalLM, *, num_blocks: int, block_size: int, device: torch.device):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.kv_caches = model.allocate_kv_cache(num_blocks * block_size)
        self._block_offsets = torch.arange(block_size)

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSequence]) -> tuple[list[int], torch.Tensor | None]:
        """Compute the step. Returns the positions in `batch` of the sequences whose
        tokens are now all computed (they sample next) and their float32 logits [N, vocab]."""
        if all(s.num_tokens == 1 for s in batch):
            return self._run_decode(batch)
        input_ids, positions, slot_mapping, context_slots = [], [], [], []
        query_lens, context_lens, sample_rows, sample_at = [], [], [], []
        offset = 0
        for i, s in enumerate(batch):
            seq, start, n = s.seq, s.seq.num_computed_tokens, s.num_tokens
            end = start + n
            slots = self._slots(seq.block_table, end)
            input_ids.extend(seq.token_ids[start:end])
            positions.append(torch.arange(start, end))
            slot_mapping.append(slots[start:end])
            context_slots.append(slots)
            query_lens.append(n)
            context_lens.append(end)
            offset += n
            if end == len(seq.token_ids):
                sample_rows.append(i)
                sample_at.append(offset - 1)
        meta = AttentionMetadata(
            query_lens=tuple(query_lens),
            context_lens=tuple(context_lens),
            slot_mapping=torch.cat(slot_mapping).to(self.device),
            context_slots=tuple(s.to(self.device) for s in context_slots),
        )
        hidden = self.model(
            torch.tensor(input_ids, device=self.device), torch.cat(positions).to(self.device), self.kv_caches, meta
        )
        if not sample_rows:
            return [], None
        return sample_rows, self.model.compute_logits(hidden[torch.tensor(sample_at, device=self.device)])

    def _run_decode(self, batch: list[ScheduledSequence]) -> tuple[list[int], torch.Tensor | None]:
        """One token per sequence: plain lists, one tensor per field, no per-sequence tensors."""
        bs = self.block_size
        input_ids, positions, slot_mapping, sample_rows = [], [], [], []
        max_blocks = max(len(s.seq.block_table) for s in batch)
        block_tables = []
        for i, s in enumerate(batch):
            seq = s.seq
            pos = seq.num_computed_tokens
            table = seq.block_table
            input_ids.append(seq.token_ids[pos])
            positions.append(pos)
            slot_mapping.append(table[pos // bs] * bs + pos % bs)
            block_tables.append(table + [0] * (max_blocks - len(table)))
            if pos + 1 == len(seq.token_ids):
                sample_rows.append(i)
        device = self.device
        positions_t = torch.tensor(positions, device=device)
        meta = AttentionMetadata(
            query_lens=(1,) * len(batch),
            context_lens=tuple(p + 1 for p in positions),
            slot_mapping=torch.tensor(slot_mapping, device=device),
            decode=DecodeMetadata(
                block_tables=torch.tensor(block_tables, dtype=torch.int32, device=device),
                context_lens=(positions_t + 1).to(torch.int32),
                block_size=bs,
            ),
        )
        hidden = self.model(torch.tensor(input_ids, device=device), positions_t, self.kv_caches, meta)
        if not sample_rows:
            return [], None
        if len(sample_rows) < len(batch):
            hidden = hidden[torch.tensor(sample_rows, device=device)]
        return sample_rows, self.model.compute_logits(hidden)

    def _slots(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """Cache slots of positions 0..num_tokens-1 of a sequence."""
        blocks = torch.tensor(block_table)
        return (blocks[:, None] * self.block_size + self._block_offsets).flatten()[:num_tokens]
