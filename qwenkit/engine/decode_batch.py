"""A decode step's inputs, built by one function for every path that runs one.

The eager module path, the fused CPU step, the compiled step and the CUDA graphs all take the
`DecodeBatch` of `prepare_decode` (vLLM v1's single input preparation, nano-vllm's one
`prepare_decode`): token ids, positions, cache slots and context lengths as one int32 block
`[4, rows]`, and the block tables `[rows, width]`. The compiled and graphed paths pad the batch
to a bucket of `batch_buckets` (a fixed shape per bucket: one graph each) and the block tables
to the longest context the engine takes; the eager paths take it as it is. Padding rows have
context length 0 (attention gives them zeros) and write their keys to a spare slot past the
last block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenkit.models.attention import AttentionMetadata, DecodeMetadata

# Rows of `DecodeBatch.inputs`.
IDS, POSITIONS, SLOTS, CONTEXT_LENS = range(4)


def batch_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """The batch sizes a padded decode step takes: 1, 2, 4, 8, 16, then steps of half the last
    power of two (32, 48, 64, 96, 128, 192, 256, ...), so that at most a third of a step is
    padding with few graphs to compile or capture. Ends at max_num_seqs."""
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b = b * 2 if b < 32 else b + (1 << (b.bit_length() - 2))
    return (*sizes, max_num_seqs)


def bucket_for(num_seqs: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `num_seqs` rows."""
    return next(b for b in buckets if b >= num_seqs)


@dataclass(frozen=True)
class DecodeBatch:
    """One decode step (a token per sequence), its first `num_seqs` rows real, the rest padding.

    inputs: int32 [4, rows] (rows IDS, POSITIONS, SLOTS, CONTEXT_LENS); block_tables: int32
    [rows, width], a sequence's row zero past its blocks."""

    inputs: torch.Tensor
    block_tables: torch.Tensor
    num_seqs: int
    block_size: int

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs[IDS]

    @property
    def positions(self) -> torch.Tensor:
        return self.inputs[POSITIONS]

    def metadata(self) -> AttentionMetadata:
        """The step's attention metadata (the decode kernels read the paged cache in place)."""
        return AttentionMetadata(
            query_lens=(),  # not read by the decode path
            context_lens=(),
            slot_mapping=self.inputs[SLOTS].long(),
            decode=DecodeMetadata(block_tables=self.block_tables, context_lens=self.inputs[CONTEXT_LENS],
                                  block_size=self.block_size),
        )

    def to(self, device: torch.device, *, non_blocking: bool = False) -> DecodeBatch:
        return DecodeBatch(self.inputs.to(device, non_blocking=non_blocking),
                           self.block_tables.to(device, non_blocking=non_blocking), self.num_seqs, self.block_size)


def prepare_decode(
    input_ids: list[int],
    positions: list[int],
    block_tables: list[list[int]],
    *,
    block_size: int,
    rows: int | None = None,
    width: int | None = None,
    padding_slot: int | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope_positions: list[int] | None = None,
) -> DecodeBatch:
    """The host tensors of a decode step: sequence i's token input_ids[i] at positions[i], over
    the blocks block_tables[i]. rows: pad to this many rows (default: none), their keys written
    to `padding_slot`; width: block-table columns (default: the longest table); out: host
    buffers (int32 [4, >= rows], [>= rows, >= width]) to write into instead of new ones (the
    CUDA graphs' pinned staging); the batch is then views of them. rope_positions: the rotary
    positions where they differ from the cache positions (M-RoPE's per-sequence offset)."""
    num_seqs = len(input_ids)
    rows = num_seqs if rows is None else rows
    width = max((len(t) for t in block_tables), default=0) if width is None else width
    if rows < num_seqs:
        raise ValueError(f"a decode batch of {num_seqs} sequences does not fit {rows} rows")
    if rows > num_seqs and padding_slot is None:
        raise ValueError("padding rows need a padding_slot to write their keys to")
    if out is None:
        out = torch.empty(4, rows, dtype=torch.int32), torch.empty(rows, width, dtype=torch.int32)
    inputs, tables = out[0][:, :rows], out[1][:rows, :width]
    host, table_rows = inputs.numpy(), tables.numpy()
    host[IDS, :num_seqs] = input_ids
    host[POSITIONS, :num_seqs] = positions
    host[SLOTS, :num_seqs] = [t[p // block_size] * block_size + p % block_size for t, p in zip(block_tables, positions)]
    host[CONTEXT_LENS, :num_seqs] = host[POSITIONS, :num_seqs] + 1
    if rope_positions is not None:
        host[POSITIONS, :num_seqs] = rope_positions
    host[:, num_seqs:] = 0
    if rows > num_seqs:
        host[SLOTS, num_seqs:] = padding_slot
    table_rows[:] = 0
    for i, table in enumerate(block_tables):
        table_rows[i, : len(table)] = table
    return DecodeBatch(inputs, tables, num_seqs, block_size)
