"""Decode steps replayed from CUDA graphs, one captured per batch-size bucket at start-up.

A decode step of a small model is thousands of tiny kernels; launched one by one from
Python the GPU idles most of the step (issue #13 measured 4.35 ms of kernels in a 42.7 ms
step of Qwen3-0.6B). A CUDA graph launches the whole step — embedding, every layer, the
final norm and the lm_head — in one call. Graphs replay fixed shapes and fixed memory,
so each bucket (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, ... up to max_num_seqs) reads its
inputs from static buffers: token ids, positions, cache slots and context lengths as one
int32 block, and block tables `[max_num_seqs, max_blocks_per_seq]`, of which a step copies
only the rows and columns it uses (the attention kernel reads a table no further than its
context). Padding rows have context length 0 and write their keys to a spare slot past
the last block. All graphs share one memory pool; the largest is captured first.

With `capture=False` the same buffers and padding run eagerly: the test suite checks the
bucket logic on the CPU that way.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from qwenkit.models import QwenForCausalLM
from qwenkit.models.attention import AttentionMetadata, DecodeMetadata


def graph_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, 16, then steps of half the last power of two (32, 48, 64, 96, 128, 192,
    256, ...): at most a third of a step is padding, with few graphs. Ends at max_num_seqs."""
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b = b * 2 if b < 32 else b + (1 << (b.bit_length() - 2))
    return (*sizes, max_num_seqs)


class CUDAGraphDecode:
    """Decode steps (one token per sequence) through captured graphs; returns logits."""

    # Rows of the int32 input block.
    _IDS, _POSITIONS, _SLOTS, _CONTEXT_LENS = range(4)

    def __init__(
        self,
        model: QwenForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        block_size: int,
        padding_slot: int,
        device: torch.device,
        capture: bool = True,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = graph_buckets(max_num_seqs)
        self.block_size = block_size
        self.padding_slot = padding_slot
        self.device = device
        self.capture = capture
        rows = self.buckets[-1]
        pin = device.type == "cuda"
        # Host staging buffers (pinned on CUDA, so the copies are asynchronous) and their
        # static device twins, which the graphs read.
        self._host_inputs = torch.zeros(4, rows, dtype=torch.int32, pin_memory=pin)
        self._host_tables = torch.zeros(rows, max_blocks_per_seq, dtype=torch.int32, pin_memory=pin)
        self._inputs = torch.zeros(4, rows, dtype=torch.int32, device=device)
        self._tables = torch.zeros(rows, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    def _forward(self, bucket: int) -> torch.Tensor:
        """The step for `bucket` rows of the static buffers: logits [bucket, vocab]."""
        inputs = self._inputs[:, :bucket]
        meta = AttentionMetadata(
            query_lens=(),  # not read by the decode path
            context_lens=(),
            slot_mapping=inputs[self._SLOTS].long(),
            decode=DecodeMetadata(
                block_tables=self._tables[:bucket],
                context_lens=inputs[self._CONTEXT_LENS],
                block_size=self.block_size,
            ),
        )
        hidden = self.model(inputs[self._IDS], inputs[self._POSITIONS], self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture_graphs(self, *, progress: bool = True) -> float:
        """Capture every bucket (padding rows only: the cache is not touched but for the
        spare slot). Returns the seconds it took."""
        start = time.perf_counter()
        self._stage([], [], [], len(self.buckets) and self.buckets[-1])
        self._inputs.copy_(self._host_inputs)
        pool = torch.cuda.graph_pool_handle()
        for i, bucket in enumerate(reversed(self.buckets)):
            if progress:
                print(f"\rqwenkit: capturing CUDA graphs of the decode step, batch size {bucket} "
                      f"({i + 1}/{len(self.buckets)}, {time.perf_counter() - start:.1f} s)...",
                      end="", file=sys.stderr, flush=True)
            self._forward(bucket)  # compiles the Triton kernels, sizes cuBLAS workspaces
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[bucket] = self._forward(bucket)
            self._graphs[bucket] = graph
        torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        if progress:
            print(f"\rqwenkit: captured CUDA graphs of the decode step for batch sizes "
                  f"{', '.join(map(str, self.buckets))} in {elapsed:.1f} s" + " " * 20, file=sys.stderr, flush=True)
        return elapsed

    def _stage(self, input_ids: list[int], positions: list[int], block_tables: list[list[int]], bucket: int) -> int:
        """Write a step's inputs into the host buffers, padding rows up to `bucket`; returns
        the width of the block tables written."""
        n, bs = len(input_ids), self.block_size
        host = self._host_inputs.numpy()
        host[:, n:bucket] = 0
        host[self._SLOTS, n:bucket] = self.padding_slot
        host[self._IDS, :n] = input_ids
        host[self._POSITIONS, :n] = positions
        host[self._SLOTS, :n] = [t[p // bs] * bs + p % bs for t, p in zip(block_tables, positions)]
        host[self._CONTEXT_LENS, :n] = np.asarray(positions) + 1 if n else 0
        width = max((len(t) for t in block_tables), default=0)
        tables = self._host_tables.numpy()
        for i, table in enumerate(block_tables):
            tables[i, : len(table)] = table
        return width

    def __call__(self, input_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """float32 logits [len(input_ids), vocab] of a decode step (one token per sequence)."""
        num_seqs = len(input_ids)
        bucket = next(b for b in self.buckets if b >= num_seqs)
        width = self._stage(input_ids, positions, block_tables, bucket)
        self._inputs[:, :bucket].copy_(self._host_inputs[:, :bucket], non_blocking=True)
        self._tables[:num_seqs, :width].copy_(self._host_tables[:num_seqs, :width], non_blocking=True)
        if self.capture:
            self._graphs[bucket].replay()
            logits = self._outputs[bucket]
        else:
            logits = self._forward(bucket)
        return logits[:num_seqs]
