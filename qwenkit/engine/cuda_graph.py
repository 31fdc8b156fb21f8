"""Decode steps replayed from CUDA graphs, one captured per batch-size bucket at start-up.

A decode step of a small model is thousands of tiny kernels; launched one by one from
Python the GPU idles most of the step (issue #13 measured 4.35 ms of kernels in a 42.7 ms
step of Qwen3-0.6B). A CUDA graph launches the whole step — embedding, every layer, the
final norm and the lm_head — in one call. Graphs replay fixed shapes and fixed memory,
so each bucket (`batch_buckets`: 1, 2, 4, 8, 16, 32, 48, 64, 96, 128, ... up to max_num_seqs)
reads its inputs from static buffers: the `DecodeBatch` every decode path builds
(`prepare_decode`: token ids, positions, cache slots and context lengths as one int32 block,
and block tables `[max_num_seqs, max_blocks_per_seq]`), staged in pinned host memory, of which
a step copies only the rows and columns it uses (the attention kernel reads a table no further
than its context). Padding rows have context length 0 and write their keys to a spare slot past
the last block. All graphs share one memory pool; the largest is captured first.

With `capture=False` the same buffers and padding run eagerly: the test suite checks the
bucket logic on the CPU that way.
"""

from __future__ import annotations

import torch

from qwenkit.engine.bucketed_decode import BucketedDecode
from qwenkit.engine.decode_batch import DecodeBatch, bucket_for, prepare_decode


class CUDAGraphDecode(BucketedDecode):
    """Decode steps (one token per sequence) through captured graphs; returns logits."""

    def __init__(self, *args, capture: bool = True, **kwargs):  # and BucketedDecode's
        super().__init__(*args, **kwargs)
        self.capture = capture
        rows = self.buckets[-1]
        pin = self.device.type == "cuda"
        # Host staging buffers (pinned on CUDA, so the copies are asynchronous) and their
        # static device twins, which the graphs read.
        self._host_inputs = torch.zeros(4, rows, dtype=torch.int32, pin_memory=pin)
        self._host_tables = torch.zeros(rows, self.max_blocks_per_seq, dtype=torch.int32, pin_memory=pin)
        self._inputs = torch.zeros(4, rows, dtype=torch.int32, device=self.device)
        self._tables = torch.zeros(rows, self.max_blocks_per_seq, dtype=torch.int32, device=self.device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    def _forward(self, bucket: int) -> torch.Tensor:
        """The step for `bucket` rows of the static buffers: logits [bucket, vocab]."""
        batch = DecodeBatch(self._inputs[:, :bucket], self._tables[:bucket], bucket, self.block_size)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.metadata())
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture_graphs(self, *, progress: bool = True) -> float:
        """Capture every bucket (padding rows only: the cache is not touched but for the
        spare slot). Returns the seconds it took."""
        self._stage([], [], [], self.buckets[-1])
        self._inputs.copy_(self._host_inputs)
        pool = torch.cuda.graph_pool_handle()

        def capture(bucket: int) -> None:
            self._forward(bucket)  # compiles the Triton kernels, sizes cuBLAS workspaces
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[bucket] = self._forward(bucket)
            self._graphs[bucket] = graph

        elapsed = self._each_bucket(list(reversed(self.buckets)), capture, doing="capturing CUDA graphs of",
                                    done="captured CUDA graphs of", progress=progress)
        torch.cuda.synchronize(self.device)
        return elapsed

    def _stage(self, input_ids: list[int], positions: list[int], block_tables: list[list[int]],
               bucket: int) -> DecodeBatch:
        """A step's inputs in the host buffers, padded to `bucket` rows."""
        return prepare_decode(input_ids, positions, block_tables, block_size=self.block_size, rows=bucket,
                              padding_slot=self.padding_slot, out=(self._host_inputs, self._host_tables))

    def __call__(self, input_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """float32 logits [len(input_ids), vocab] of a decode step (one token per sequence)."""
        num_seqs = len(input_ids)
        bucket = bucket_for(num_seqs, self.buckets)
        host = self._stage(input_ids, positions, block_tables, bucket)
        width = host.block_tables.shape[1]
        self._inputs[:, :bucket].copy_(host.inputs, non_blocking=True)
        self._tables[:num_seqs, :width].copy_(host.block_tables[:num_seqs], non_blocking=True)
        if self.capture:
            self._graphs[bucket].replay()
            logits = self._outputs[bucket]
        else:
            logits = self._forward(bucket)
        return logits[:num_seqs]
