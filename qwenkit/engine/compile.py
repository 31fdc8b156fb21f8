"""`torch.compile` of the decode step (opt-in: `LLM(compile=True)`, `--compile`).

A decode step has static shapes once its batch is padded to a bucket (`batch_buckets`: 1, 2,
4, ... up to `max_num_seqs`) and its block tables to the longest context (`prepare_decode`, as
every decode path builds its inputs), so each bucket is one inductor graph of the whole stack after the embedding: the norms, RoPE, SiLU-and-mul and
residual adds fuse into a few C++ loops around the matmuls; attention is the opaque
`qwenkit::write_kv_cache` and `qwenkit::paged_decode_attention` ops, which write the cache and
read it in place. Padding rows
have context length 0 and write their keys to a spare slot past the last block.

Every bucket is compiled at start-up (a progress line on stderr), so no request waits on
a compile; inductor's on-disk caches live in the qwenkit home, so later starts reuse
them. Prefill and mixed steps stay eager.
"""

from __future__ import annotations

import os

import torch

from qwenkit.engine.bucketed_decode import BucketedDecode
from qwenkit.engine.decode_batch import DecodeBatch, bucket_for, prepare_decode
from qwenkit.models.attention import AttentionMetadata


def use_qwenkit_inductor_cache() -> None:
    """Keep inductor's compiled kernels and FX graph cache in the qwenkit home (unless
    TORCHINDUCTOR_CACHE_DIR is set), so they survive /tmp cleaning and are found next run."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from qwenkit.paths import inductor_cache_dir

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())


class CompiledDecode(BucketedDecode):
    """Decode steps through one compiled graph per batch bucket."""

    def __init__(self, *args, **kwargs):  # BucketedDecode's
        super().__init__(*args, **kwargs)
        use_qwenkit_inductor_cache()
        # One graph per bucket, and per model in a process that builds several (tests).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._forward = torch.compile(self._layers, dynamic=False, fullgraph=True)

    def _layers(self, h: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model.model.forward_layers(h, positions, self.kv_caches, meta)

    def __call__(self, input_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Final hidden states [len(input_ids), hidden] of a decode step (one token per sequence)."""
        batch = self._padded(input_ids, positions, block_tables, bucket_for(len(input_ids), self.buckets))
        return self._run(batch)[: batch.num_seqs]

    def _padded(self, input_ids: list[int], positions: list[int], block_tables: list[list[int]],
                bucket: int) -> DecodeBatch:
        return prepare_decode(input_ids, positions, block_tables, block_size=self.block_size, rows=bucket,
                              width=self.max_blocks_per_seq, padding_slot=self.padding_slot).to(self.device)

    def _run(self, batch: DecodeBatch) -> torch.Tensor:
        h = self.model.model.embed_tokens(batch.input_ids)
        return self._forward(h, batch.positions, batch.metadata())

    @torch.inference_mode()
    def warm_up(self, *, progress: bool = True) -> float:
        """Compile every bucket now (padding rows only: the cache is not touched but for the
        spare slot). Returns the seconds it took."""
        return self._each_bucket(self.buckets, self._warm_bucket, doing="compiling", done="compiled",
                                 progress=progress)

    def _warm_bucket(self, bucket: int) -> None:
        self._run(self._padded([], [], [], bucket))
