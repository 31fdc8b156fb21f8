"""Runs one scheduled step on the model: builds the flattened batch and its paged
attention metadata, and returns the logits of the sequences that sample a token."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from qwenkit import kernels
from qwenkit.engine.decode_batch import DecodeBatch, prepare_decode
from qwenkit.engine.host_memory import return_large_buffers
from qwenkit.engine.scheduler import ScheduledSequence
from qwenkit.engine.threads import configure_threads
from qwenkit.errors import QwenkitError
from qwenkit.kernels import cuda as cuda_kernels
from qwenkit.models import QwenForCausalLM
from qwenkit.models.attention import AttentionMetadata, PagedPrefillMetadata
from qwenkit.models.layers import SparseMoeBlock

logger = logging.getLogger(__name__)

KV_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_kv_cache_dtype(kv_cache_dtype: str | None, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype. "auto" (None): float16 where a CPU computes in float32 (half the
    cache's bytes, widened in the C attention kernel: no measurable cost, docs/decode.md), else
    the model's dtype: on CUDA, and on a CPU standing in for one (Triton's interpreter, tests),
    the cache stays the model's dtype unless asked."""
    if kv_cache_dtype in (None, "auto"):
        cpu_kernels = device.type == "cpu" and not cuda_kernels.enabled(device)
        return torch.float16 if cpu_kernels and model_dtype == torch.float32 else model_dtype
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise QwenkitError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; choose one of auto, {', '.join(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[kv_cache_dtype]

def kv_bytes_per_token(model: QwenForCausalLM, kv_dtype: torch.dtype | None = None) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * model.num_kv_heads * c.head_dim * (kv_dtype or model.dtype).itemsize


@dataclass(frozen=True)
class StepInput:
    """A scheduled step as plain data, per sequence: the tokens it computes, the position of
    the first, its block table, whether it samples after the step (its tokens are then all
    computed) and how many of its tokens are drafts (speculative decoding: the step returns
    logits at the last token and at each draft). No engine objects: a tensor-parallel worker
    runs it as the driver does."""

    token_ids: list[list[int]]
    starts: list[int]
    block_tables: list[list[int]]
    samples: list[bool]
    num_drafts: list[int] | None = None  # None: no drafts anywhere
    # Per sequence its MultimodalPrompt or None; None for a step without images.
    multimodal: list | None = None

    @classmethod
    def from_batch(cls, batch: list[ScheduledSequence]) -> "StepInput":
        token_ids, starts, tables, samples, drafts = [], [], [], [], []
        for s in batch:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_tokens
            length = len(seq.token_ids)
            ids = seq.token_ids[start:end]
            if end > length:
                ids += seq.draft_token_ids[: end - length]
            token_ids.append(ids)
            starts.append(start)
            tables.append(seq.block_table)
            samples.append(end >= length)
            drafts.append(max(0, end - length))
        multimodal = [s.seq.multimodal for s in batch]
        return cls(token_ids, starts, tables, samples, drafts if any(drafts) else None,
                   multimodal if any(multimodal) else None)

    @property
    def sample_rows(self) -> list[int]:
        return [i for i, samples in enumerate(self.samples) if samples]

    def drafts(self, i: int) -> int:
        return self.num_drafts[i] if self.num_drafts else 0


def cuda_graphs_apply(model: QwenForCausalLM, device: torch.device) -> bool:
    """Whether a decode step of `model` can be captured as a CUDA graph: on CUDA, unless an
    MoE layer would read its routing back to the host (float32 experts)."""
    if device.type != "cuda":
        return False
    moe_syncs = kernels.moe_syncs_with_host(model.dtype, device)
    return all(
        not getattr(m, "syncs_with_host", False) and not (isinstance(m, SparseMoeBlock) and moe_syncs)
        for m in model.modules()
    )


class ModelRunner:
    """Decode steps (one token per sequence) take the fastest path that applies:
    - on CUDA, `CUDAGraphDecode` (graphs captured here per batch bucket) unless
      enforce_eager;
    - compile: `CompiledDecode` (torch.compile, warmed up here);
    - on CPU, `FusedDecode` where it applies (float32 with native-kernel weights);
    - else the model's modules, eagerly. Both graph paths need max_model_len and
    max_num_seqs to size their buffers."""

    def __init__(
        self,
        model: QwenForCausalLM,
        *,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        compile: bool = False,
        enforce_eager: bool = False,
        max_model_len: int | None = None,
        max_num_seqs: int = 32,
        kv_dtype: torch.dtype | None = None,
        progress: bool = True,
        deterministic: bool = False,
    ):
        self.model = model
        self.kv_dtype = kv_dtype or model.dtype
        self.block_size = block_size
        self.device = device
        # Batch-invariant steps (CPU, `kernels.batch_invariant`): matmuls that compute each row
        # alike whatever the row count, and each query token's attention by the decode kernel
        # over its own context (as the fused decode step computes it).
        self.deterministic = deterministic and device.type == "cpu"
        if deterministic and not self.deterministic:
            logger.warning("deterministic steps are a CPU feature: on %s, a request's tokens may still depend on "
                           "the rest of its batch (docs/determinism.md)", device.type)
        if device.type == "cpu":
            configure_threads()
            return_large_buffers()
        num_slots = num_blocks * block_size
        # One spare slot past the last block: padding rows of a compiled step write there.
        self.kv_caches = model.allocate_kv_cache(num_slots + 1, device, dtype=self.kv_dtype)
        self._block_offsets = torch.arange(block_size)
        # Prefill attention reads the paged cache in place (no per-sequence gathers): Triton on CUDA,
        # the native kernel on CPU.
        self.paged_prefill = cuda_kernels.enabled(device) or (
            device.type == "cpu" and kernels.native_prefill_attention(model.config.head_dim, self.kv_dtype))
        # On CPU, a pooling step whose prompts start at position 0 (no cached prefix) attends with
        # torch's SDPA per prompt, in the model's dtype, rather than the native paged kernel, which
        # computes in float32 (bfloat16: 1.09x the embeddings/s at 2 layers, even at 28; docs/benchmarks.md).
        self.pool_with_sdpa = device.type == "cpu"
        self.compiled = None
        self.fused = None
        self.graphs = None
        # A vision-language model's image embeddings, per image content hash (qwenkit/multimodal).
        self.encoder_cache = None
        if getattr(model.config, "is_vision", False):
            from qwenkit.multimodal.inputs import EncoderCache

            self.encoder_cache = EncoderCache(model.embed_images)
        max_model_len = max_model_len or model.config.max_position_embeddings
        sizes = dict(max_num_seqs=max_num_seqs, max_blocks_per_seq=-(-max_model_len // block_size),
                     block_size=block_size, padding_slot=num_slots, device=device)
        if compile and not self.deterministic:
            from qwenkit.engine.compile import CompiledDecode

            self.compiled = CompiledDecode(model, self.kv_caches, **sizes)
            self.compiled.warm_up(progress=progress)
        elif not enforce_eager and cuda_graphs_apply(model, device):
            from qwenkit.engine.cuda_graph import CUDAGraphDecode

            self.graphs = CUDAGraphDecode(model, self.kv_caches, **sizes)
            self.graphs.capture_graphs(progress=progress)
        else:
            from qwenkit.models.fused_decode import FusedDecode

            # Deterministic steps need the fused step's numbers to be the module path's (which a
            # prefix-cache miss or a preempted token's recompute takes); a half-precision module
            # path rounds between operations, the fused step (float32 throughout) does not.
            if not (self.deterministic and model.dtype != torch.float32):
                self.fused = FusedDecode.build(model, self.kv_caches)

    def run(self, batch: list[ScheduledSequence], *, pooling: bool = False) -> tuple[list[int], torch.Tensor | None]:
        """Compute the step. Returns the positions in `batch` of the sequences whose
        tokens are now all computed (they sample next) and their float32 logits [N, vocab],
        a sequence with d drafts d + 1 rows (its last token's, then each draft's), in order;
        with `pooling`, their last tokens' final hidden states [N, hidden] instead (an
        embedding model's last-token pooling, qwenkit/embedding.py)."""
        return self.execute(StepInput.from_batch(batch), pooling=pooling)

    @torch.inference_mode()
    def execute(self, step: "StepInput", *, pooling: bool = False) -> tuple[list[int], torch.Tensor | None]:
        """`run` on a step given as plain data (what a tensor-parallel worker receives)."""
        with kernels.batch_invariant(self.deterministic):
            return self._execute(step, pooling)

    def _head(self, pooling: bool):
        return (lambda hidden: hidden.float()) if pooling else self.model.compute_logits

    def _execute(self, step: "StepInput", pooling: bool = False) -> tuple[list[int], torch.Tensor | None]:
        if all(len(ids) <= 1 + step.drafts(i) for i, ids in enumerate(step.token_ids)):
            return self._run_decode(step, pooling)
        input_ids, positions, slot_mapping, context_slots = [], [], [], []
        query_lens, context_lens, sample_at = [], [], []
        offset = 0
        for i, (ids, start, table, samples) in enumerate(zip(step.token_ids, step.starts, step.block_tables,
                                                             step.samples)):
            n = len(ids)
            end = start + n
            slots = self._slots(table, end)
            input_ids.extend(ids)
            positions.append(torch.arange(start, end))
            slot_mapping.append(slots[start:end])
            context_slots.append(slots)
            query_lens.append(n)
            context_lens.append(end)
            offset += n
            if samples:
                sample_at.extend(range(offset - 1 - step.drafts(i), offset))
        sample_rows = step.sample_rows
        positions_t = torch.cat(positions)
        if self.deterministic and step.multimodal is None:
            # Each query token as a one-token "sequence" of its own context: the decode kernel's
            # numbers for it, whatever the step's split into chunks or its cached prefix.
            rows = [i for i, n in enumerate(query_lens) for _ in range(n)]
            meta = self.decode_batch(input_ids, positions_t.tolist(), [step.block_tables[i] for i in rows]).metadata()
        elif self.paged_prefill and not (pooling and self.pool_with_sdpa and not any(step.starts)):
            meta = AttentionMetadata(
                query_lens=tuple(query_lens),
                context_lens=tuple(context_lens),
                slot_mapping=torch.cat(slot_mapping).to(self.device),
                paged_prefill=self._paged_prefill_metadata(step.block_tables, query_lens, context_lens),
            )
        else:
            meta = AttentionMetadata(
                query_lens=tuple(query_lens),
                context_lens=tuple(context_lens),
                slot_mapping=torch.cat(slot_mapping).to(self.device),
                context_slots=tuple(s.to(self.device) for s in context_slots),
            )
        if step.multimodal is not None:
            hidden = self._forward_multimodal(step, input_ids, meta)
        else:
            hidden = self.model(
                torch.tensor(input_ids, device=self.device), positions_t.to(self.device), self.kv_caches, meta
            )
        if not sample_rows:
            return [], None
        return sample_rows, self._head(pooling)(hidden[torch.tensor(sample_at, device=self.device)])

    def _forward_multimodal(self, step: "StepInput", input_ids: list[int], meta: AttentionMetadata) -> torch.Tensor:
        """A step with image tokens: M-RoPE positions [3, T], and each image's embeddings (from the
        encoder cache: the tower runs once per image) over its placeholder rows, however the
        prompt is chunked."""
        positions, pieces, row = [], [], 0
        for ids, start, mm in zip(step.token_ids, step.starts, step.multimodal):
            end = start + len(ids)
            if mm is None:
                positions.append(torch.arange(start, end).expand(3, -1))
            else:
                positions.append(mm.positions_of(start, end))
                pieces.extend((row + lo - start, image, a, b) for lo, image, a, b in mm.pieces(start, end))
            row += len(ids)
        inner = self.model.model
        h = inner.embed_tokens(torch.tensor(input_ids, device=self.device))
        width, num_deepstack = h.shape[1], getattr(self.model, "num_deepstack", 0)
        rows, features = [], []
        if pieces:
            embeds = self.encoder_cache.get([image for _, image, _, _ in pieces])
            for r, image, a, b in pieces:
                e = embeds[image.content_hash][a:b].to(h.device)
                h[r : r + b - a] = e[:, :width]
                if num_deepstack:  # Qwen3-VL: the DeepStack features after the embeddings
                    rows.append(torch.arange(r, r + b - a, device=h.device))
                    features.append(e[:, width:].view(b - a, num_deepstack, width))
        extra = {}
        if rows:
            extra["deepstack"] = torch.cat(rows), torch.cat(features).transpose(0, 1)
        return inner.forward_layers(h, torch.cat(positions, dim=1).to(self.device), self.kv_caches, meta, **extra)

    def _run_decode(self, step: "StepInput", pooling: bool = False) -> tuple[list[int], torch.Tensor | None]:
        """One token per row: plain lists, one tensor per field, no per-sequence tensors. A
        sequence with drafts takes a row per token (its last, then each draft), each attending
        over its own context: a draft's row computes what a decode step after it would."""
        # M-RoPE: a sequence with images decodes at its cache position + its rope_delta (1-D RoPE
        # from there on); the fused and eager paths take the offset, the padded ones do not yet.
        deltas = None
        if step.multimodal is not None:
            deltas = [mm.rope_delta if mm is not None else 0 for mm in step.multimodal]
        if step.num_drafts is None:
            input_ids = [ids[0] for ids in step.token_ids]
            positions, block_tables, sample_rows = step.starts, step.block_tables, step.sample_rows
            logit_rows = sample_rows
        else:
            input_ids, positions, block_tables, logit_rows, row_deltas = [], [], [], [], []
            for i, (ids, start, table, samples) in enumerate(zip(step.token_ids, step.starts, step.block_tables,
                                                                 step.samples)):
                input_ids.extend(ids)
                positions.extend(range(start, start + len(ids)))
                block_tables.extend([table] * len(ids))
                if deltas is not None:
                    row_deltas.extend([deltas[i]] * len(ids))
                if samples:
                    logit_rows.extend(range(len(input_ids) - 1 - step.drafts(i), len(input_ids)))
            sample_rows = step.sample_rows
            deltas = row_deltas if deltas is not None else None
        num_rows = len(input_ids)
        rope = None if deltas is None else [p + d for p, d in zip(positions, deltas)]
        # A graph ends in the lm_head: pooling takes the eager path.
        if self.graphs is not None and not pooling and rope is None and num_rows <= self.graphs.buckets[-1]:
            logits = self.graphs(input_ids, positions, block_tables)
            if not sample_rows:
                return [], None
            if len(logit_rows) < num_rows:
                logits = logits[torch.tensor(logit_rows, device=self.device)]
            return sample_rows, logits
        if self.compiled is not None and rope is None and num_rows <= self.compiled.buckets[-1]:
            hidden = self.compiled(input_ids, positions, block_tables)
        else:
            batch = self.decode_batch(input_ids, positions, block_tables, rope_positions=rope)
            if self.fused is not None and self.fused.applies(num_rows):
                hidden = self.fused(batch.input_ids, batch.positions, batch.metadata())
            else:
                hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.metadata())
        if not sample_rows:
            return [], None
        if len(logit_rows) < num_rows:
            hidden = hidden[torch.tensor(logit_rows, device=self.device)]
        return sample_rows, self._head(pooling)(hidden)

    def decode_batch(self, input_ids: list[int], positions: list[int], block_tables: list[list[int]], *,
                     rope_positions: list[int] | None = None) -> DecodeBatch:
        """The inputs of a decode step as the eager and fused paths take them (unpadded), on the
        device: `prepare_decode`, which the compiled and graphed paths pad to a bucket."""
        return prepare_decode(input_ids, positions, block_tables, block_size=self.block_size,
                              rope_positions=rope_positions).to(self.device)

    def _paged_prefill_metadata(
        self, tables: list[list[int]], query_lens: list[int], context_lens: list[int]
    ) -> PagedPrefillMetadata:
        width = max(len(t) for t in tables)
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        ints = dict(dtype=torch.int32, device=self.device)
        return PagedPrefillMetadata(
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], **ints),
            query_start_loc=torch.tensor(starts, **ints),
            context_lens=torch.tensor(context_lens, **ints),
            max_query_len=max(query_lens),
            block_size=self.block_size,
        )

    def _slots(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """Cache slots of positions 0..num_tokens-1 of a sequence."""
        blocks = torch.tensor(block_table)
        return (blocks[:, None] * self.block_size + self._block_offsets).flatten()[:num_tokens]
