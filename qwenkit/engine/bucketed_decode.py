"""What the compiled and the CUDA-graph decode steps share: the model and its caches, the
batch buckets (one graph each), the padding, and the loop that builds every bucket ahead of
the first request with a progress line."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from qwenkit.engine.decode_batch import batch_buckets
from qwenkit.models import QwenForCausalLM


class BucketedDecode:
    """A decode step (one token per sequence) run at one of `buckets` batch sizes, padded."""

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
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = batch_buckets(max_num_seqs)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_size = block_size
        self.padding_slot = padding_slot
        self.device = device

    def _each_bucket(self, buckets: list[int], build: Callable[[int], None], *, doing: str, done: str,
                     progress: bool) -> float:
        """`build(bucket)` for each of `buckets`, with a progress line on stderr ("qwenkit:
        {doing} the decode step, batch size ..." then "qwenkit: {done} ..."). Returns the seconds."""
        start = time.perf_counter()
        for i, bucket in enumerate(buckets):
            if progress:
                print(f"\rqwenkit: {doing} the decode step, batch size {bucket} "
                      f"({i + 1}/{len(buckets)}, {time.perf_counter() - start:.1f} s)...",
                      end="", file=sys.stderr, flush=True)
            build(bucket)
        elapsed = time.perf_counter() - start
        if progress:
            print(f"\rqwenkit: {done} the decode step for batch sizes {', '.join(map(str, self.buckets))} "
                  f"in {elapsed:.1f} s" + " " * 20, file=sys.stderr, flush=True)
        return elapsed
