"""Runs one scheduled step on the model: builds the flattened batch and its paged
attention metadata, and returns the logits of the sequences that sample a token."""

from __future__ import annotations

import torch

from qwenkit.engine.scheduler import ScheduledSequence
from qwenkit.engine.threads import configure_threads
from qwenkit.errors import QwenkitError
from qwenkit.models import QwenForCausalLM
from qwenkit.models.attention import AttentionMetadata, DecodeMetadata

KV_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_kv_cache_dtype(kv_cache_dtype: str | None, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype. "auto" (None): float16 where a CPU computes in float32 (half the
    cache's bytes, widened in the attention kernel: no measurable cost, docs/decode.md), else the
    model's dtype."""
    if kv_cache_dtype in (None, "auto"):
        return torch.float16 if device.type == "cpu" and model_dtype == torch.float32 else model_dtype
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise QwenkitError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; choose one of auto, {', '.join(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[kv_cache_dtype]


def kv_bytes_per_token(model: QwenForCausalLM, kv_dtype: torch.dtype | None = None) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * (kv_dtype or model.dtype).itemsize


class ModelRunner:
    """compile: run decode steps through `CompiledDecode` (warmed up here), which needs
    max_model_len and max_num_seqs to size its buckets. Otherwise decode steps run through
    `FusedDecode` where it applies (float32 on CPU with native-kernel weights), else eagerly."""

    def __init__(
        self,
        model: QwenForCausalLM,
        *,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        compile: bool = False,
        max_model_len: int | None = None,
        max_num_seqs: int = 32,
        kv_dtype: torch.dtype | None = None,
        progress: bool = True,
    ):
        self.model = model
        self.kv_dtype = kv_dtype or model.dtype
        self.block_size = block_size
        self.device = device
        if device.type == "cpu":
            configure_threads()
        num_slots = num_blocks * block_size
        # One spare slot past the last block: padding rows of a compiled step write there.
        self.kv_caches = model.allocate_kv_cache(num_slots + 1, device, dtype=self.kv_dtype)
        self._block_offsets = torch.arange(block_size)
        self.compiled = None
        self.fused = None
        if not compile:
            from qwenkit.models.fused_decode import FusedDecode

            self.fused = FusedDecode.build(model, self.kv_caches)
        else:
            from qwenkit.engine.compile import CompiledDecode

            max_model_len = max_model_len or model.config.max_position_embeddings
            self.compiled = CompiledDecode(
                model,
                self.kv_caches,
                max_num_seqs=max_num_seqs,
                max_blocks_per_seq=-(-max_model_len // block_size),
                block_size=block_size,
                padding_slot=num_slots,
                device=device,
            )
            self.compiled.warm_up(progress=progress)

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
        input_ids, positions, block_tables, sample_rows = [], [], [], []
        for i, s in enumerate(batch):
            seq = s.seq
            pos = seq.num_computed_tokens
            input_ids.append(seq.token_ids[pos])
            positions.append(pos)
            block_tables.append(seq.block_table)
            if pos + 1 == len(seq.token_ids):
                sample_rows.append(i)
        if self.compiled is not None and len(batch) <= self.compiled.buckets[-1]:
            hidden = self.compiled(input_ids, positions, block_tables)
        else:
            ids, positions_t, meta = self._decode_inputs(input_ids, positions, block_tables)
            if self.fused is not None and self.fused.applies(len(batch)):
                hidden = self.fused(ids, positions_t, meta)
            else:
                hidden = self.model(ids, positions_t, self.kv_caches, meta)
        if not sample_rows:
            return [], None
        if len(sample_rows) < len(batch):
            hidden = hidden[torch.tensor(sample_rows, device=self.device)]
        return sample_rows, self.model.compute_logits(hidden)

    def _decode_inputs(
        self, input_ids: list[int], positions: list[int], block_tables: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Token ids, positions and attention metadata of a decode step (the eager and fused paths)."""
        bs, device = self.block_size, self.device
        max_blocks = max(len(table) for table in block_tables)
        positions_t = torch.tensor(positions, device=device)
        meta = AttentionMetadata(
            query_lens=(1,) * len(input_ids),
            context_lens=tuple(p + 1 for p in positions),
            slot_mapping=torch.tensor(
                [t[p // bs] * bs + p % bs for t, p in zip(block_tables, positions)], device=device
            ),
            decode=DecodeMetadata(
                block_tables=torch.tensor(
                    [t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.int32, device=device
                ),
                context_lens=(positions_t + 1).to(torch.int32),
                block_size=bs,
            ),
        )
        return torch.tensor(input_ids, device=device), positions_t, meta

    def _slots(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """Cache slots of positions 0..num_tokens-1 of a sequence."""
        blocks = torch.tensor(block_table)
        return (blocks[:, None] * self.block_size + self._block_offsets).flatten()[:num_tokens]
