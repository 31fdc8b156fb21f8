"""The engine: many requests at once on one model. `step()` is schedule, run, postprocess."""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from dataclasses import dataclass
from collections.abc import Callable
from typing import Protocol

import torch

from qwenkit.config import GenerationConfig
from qwenkit.engine.block_manager import BlockManager
from qwenkit.engine.model_runner import ModelRunner, kv_bytes_per_token, resolve_kv_cache_dtype
from qwenkit.engine.sampler import Sampler, SamplingState
from qwenkit.engine.scheduler import ScheduledSequence, Scheduler
from qwenkit.engine.sequence import Sequence
from qwenkit.engine.speculative import (
    DraftModelProposer,
    DraftState,
    SpeculativeConfig,
    SpeculativeStats,
    draft_threshold,
)
from qwenkit.errors import ContextLengthError, QwenkitError
from qwenkit.models import QwenForCausalLM
from qwenkit.sampling import SamplingDefaults, SamplingParams
from qwenkit.tokenizer import IncrementalDetokenizer, Tokenizer

DEFAULT_KV_CACHE_MEMORY = 2 << 30


class RequestControl(Protocol):
    """Per-sequence steering beyond sampling (Qwen3 thinking budget, grammars)."""

    def allowed_mask(self) -> torch.Tensor | None:
        """bool [vocab]: the tokens allowed next, or None for all."""

    def on_token(self, token_id: int) -> list[int]:
        """Called with each generated token; returns tokens to force next (usually none)."""


@dataclass
class TokenOutput:
    token_id: int
    text: str  # the text this token completes (held-back text comes with later tokens)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class SequenceUpdate:
    """What one step produced for one of a request's completions."""

    request_id: str
    index: int
    outputs: list[TokenOutput]
    finish_reason: str | None  # "stop", "length", "abort", or None while running
    num_prompt_tokens: int
    num_cached_tokens: int


@dataclass(frozen=True)
class EngineArgs:
    """Engine sizing; None picks the device's default (`resolved`).

    kv_cache_memory: bytes for the KV pool (env QWENKIT_KV_CACHE_MEMORY, e.g. "4GiB");
    default 2 GiB on CPU, and on CUDA what is free once the weights are loaded, less 10% of
    the card and room for a step's activations (vLLM's gpu_memory_utilization=0.9); never
    more than max_num_seqs full contexts. max_num_seqs: 32 on CPU, 256 on CUDA.
    max_num_batched_tokens (a step's token budget, the prefill chunk): 512 on CPU (as
    llama.cpp's micro-batch; 1,024 measured no faster and held twice the activations), 8192
    on CUDA. enforce_eager: no CUDA graphs. deterministic (CPU): a request's tokens do not
    depend on what else is in the batch, how its prompt is chunked or whether its prefix was
    cached (batch-invariant kernels, docs/determinism.md); off by default, it costs speed.
    kv_cache_dtype: "auto" (float16 on a CPU computing in float32, else the model's dtype: on
    CUDA the cache stays the model's dtype unless asked), "float32", "float16" or "bfloat16".
    speculative: speculative decoding, which changes no output (engine/speculative.py):
    "ngram" (prompt lookup), "ngram:K", a SpeculativeConfig, or "off" / None."""

    max_model_len: int | None = None
    kv_cache_memory: int | str | None = None
    kv_cache_dtype: str | None = None
    block_size: int = 16
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    compile: bool | None = None  # torch.compile the decode step (None: the default, off)
    enforce_eager: bool = False
    deterministic: bool = False
    speculative: "SpeculativeConfig | str | None" = None

    def resolved(self, device: torch.device) -> "EngineArgs":
        cuda = device.type == "cuda"
        return dataclasses.replace(
            self,
            max_num_seqs=self.max_num_seqs or (256 if cuda else 32),
            max_num_batched_tokens=self.max_num_batched_tokens or (8192 if cuda else 512),
        )


def cuda_kv_cache_memory(model: QwenForCausalLM, device: torch.device, args: EngineArgs) -> int:
    """Bytes for the KV pool on a CUDA device: free memory, less 10% of the card and an
    estimate of the largest step's activations and logits."""
    free, total = torch.cuda.mem_get_info(device)
    c, itemsize = model.config, model.dtype.itemsize
    width = 4 * c.hidden_size + 4 * max(c.intermediate_size, c.moe_intermediate_size * c.num_experts_per_tok)
    activations = args.max_num_batched_tokens * width * itemsize * 2
    logits = args.max_num_seqs * c.vocab_size * 4 * 4  # the logits, the sampler's copies
    return max(0, free - total // 10 - activations - logits - (512 << 20))


@dataclass
class _SeqState:
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer
    stops: "StopStringMatcher"
    stop_ids: frozenset[int]
    control: RequestControl | None
    stop_matched: bool = False
    draft: DraftState | None = None  # speculative decoding's state, made at the first proposal


class LLMEngine:
    def __init__(
        self,
        model: QwenForCausalLM,
        tokenizer: Tokenizer,
        generation_config: GenerationConfig,
        *,
        device: torch.device,
        args: EngineArgs = EngineArgs(),
        runner_factory: Callable[..., ModelRunner] = ModelRunner,
        draft_model: QwenForCausalLM | None = None,
    ):
        """runner_factory(model, **sizes): the ModelRunner (a tensor-parallel group's rank 0
        passes one that runs each step on every rank). draft_model: the loaded draft model of
        `args.speculative` "draft:MODEL" (its own cache, as many blocks as the model's)."""
        self.model = model
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self.device = device
        c = model.config
        args = args.resolved(device)
        self.max_model_len = min(args.max_model_len or c.max_position_embeddings, c.max_position_embeddings)
        kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, model.dtype, device)
        memory = args.kv_cache_memory or os.environ.get("QWENKIT_KV_CACHE_MEMORY")
        if memory is None:
            memory = cuda_kv_cache_memory(model, device, args) if device.type == "cuda" else DEFAULT_KV_CACHE_MEMORY
        memory = parse_memory(memory)
        max_tokens = min(memory // kv_bytes_per_token(model, kv_dtype), args.max_num_seqs * self.max_model_len)
        num_blocks = max_tokens // args.block_size
        if num_blocks < 2:
            raise QwenkitError(f"kv_cache_memory {memory} bytes holds fewer than 2 blocks of {args.block_size} tokens")
        self.block_manager = BlockManager(
            num_blocks, args.block_size, enable_prefix_caching=args.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens
        )
        self.runner = runner_factory(
            model,
            num_blocks=num_blocks,
            block_size=args.block_size,
            device=device,
            compile=bool(args.compile),
            enforce_eager=args.enforce_eager,
            deterministic=args.deterministic,
            max_model_len=self.max_model_len,
            max_num_seqs=args.max_num_seqs,
            kv_dtype=kv_dtype,
        )
        self.sampler = Sampler()
        self.speculative = SpeculativeConfig.parse(args.speculative)
        self.spec_stats = SpeculativeStats()
        self.drafter = None
        if self.speculative.method == "draft":
            if draft_model is None:
                raise QwenkitError("speculative method 'draft' needs its draft model loaded "
                                   "(LLM(speculative='draft:MODEL') loads it)")
            draft_runner = ModelRunner(
                draft_model, num_blocks=num_blocks, block_size=args.block_size, device=device,
                enforce_eager=args.enforce_eager, deterministic=args.deterministic,
                max_model_len=self.max_model_len, max_num_seqs=args.max_num_seqs,
                kv_dtype=resolve_kv_cache_dtype(args.kv_cache_dtype, draft_model.dtype, device), progress=False)
            self.drafter = DraftModelProposer(draft_runner, c.vocab_size)
        self.requests: dict[str, list[Sequence]] = {}
        # Held while a step runs: one engine is stepped by one thread at a time (an AsyncLLM's
        # engine thread owns its engine; a second thread stepping it took tokens of its requests).
        self._stepping = threading.Lock()

    @property
    def num_kv_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        fallback: SamplingDefaults | None = None,
        controls: list[RequestControl | None] | None = None,
        multimodal=None,
    ) -> None:
        """Queue a request (its n completions). `controls[i]` steers completion i. multimodal: the
        prompt's images (a qwenkit.multimodal.MultimodalPrompt; its placeholders already expanded
        in prompt_token_ids, so the KV budget counts them)."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("the prompt is empty")
        if num_prompt >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt is {num_prompt} tokens, but the model's context is {self.max_model_len} tokens "
                "(and at least one must be left to generate)"
            )
        vocab = self.model.config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        params.check_token_ids(vocab)
        if multimodal is not None:
            _check_multimodal(self.model, multimodal, num_prompt)
        params = params.resolved(self.generation_config, fallback)
        room = self.max_model_len - num_prompt
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        if num_prompt + max_tokens > self.num_kv_tokens:
            raise ValueError(
                f"the request needs {num_prompt + max_tokens} tokens of KV cache but the pool holds "
                f"{self.num_kv_tokens}: lower max_tokens or raise kv_cache_memory (QWENKIT_KV_CACHE_MEMORY)"
            )
        eos_ids = frozenset(self.generation_config.eos_token_ids)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_ids)
        seqs = []
        for i in range(params.n):
            p = params if i == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + i)
            seq = Sequence(request_id, i, list(prompt_token_ids), num_prompt, max_tokens, multimodal=multimodal)
            seq.state = _SeqState(
                sampling=SamplingState.create(p, list(prompt_token_ids), eos_ids, self.device),
                detokenizer=IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True),
                stops=StopStringMatcher(params.stop),
                stop_ids=stop_ids,
                control=controls[i] if controls else None,
            )
            seqs.append(seq)
        self.requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free everything it holds. False if it is not running."""
        seqs = self.requests.pop(request_id, None)
        if seqs is None:
            return False
        for seq in seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[SequenceUpdate]:
        """Schedule, run, postprocess. RuntimeError where another thread is stepping the engine."""
        if not self._stepping.acquire(blocking=False):
            raise RuntimeError("another thread is stepping this engine: one thread drives an engine (an AsyncLLM's "
                               "thread drives its own: call the AsyncLLM, not its .llm)")
        try:
            if self.speculative.enabled:
                self._propose_drafts()
            batch = self.scheduler.schedule()
            if not batch:
                return []
            rows, logits = self.runner.run(batch)
            return self._postprocess(batch, rows, logits)
        finally:
            self._stepping.release()

    def _propose_drafts(self) -> None:
        """Drafts for the running sequences that decode next (one token left to compute), as
        long as the step's rows stay within `max_rows`."""
        spec = self.speculative
        room = spec.max_rows - len(self.scheduler.running)
        threshold = draft_threshold(len(self.scheduler.running))
        wanted: list[tuple[Sequence, int]] = []
        for seq in self.scheduler.running:
            if seq.num_uncomputed_tokens != 1 or room <= 0:
                continue
            st: _SeqState = seq.state
            if st.draft is None:
                st.draft = DraftState(spec)
            # The step emits up to drafts + 1 tokens: never past max_tokens.
            limit = min(room, seq.max_tokens - seq.num_output_tokens - 1)
            if self.drafter is None:
                seq.draft_token_ids = st.draft.propose(seq.token_ids, limit, threshold)
                room -= len(seq.draft_token_ids)
                continue
            k = st.draft.next_k(limit, threshold)
            # The draft model writes its cache in the sequence's blocks: they must be there.
            if k > 0 and self.block_manager.allocate(seq, len(seq.token_ids) + k):
                wanted.append((seq, k))
                room -= k
        if wanted:
            seqs, ks = zip(*wanted)
            for seq, drafts in zip(seqs, self.drafter.propose(list(seqs), list(ks))):
                seq.draft_token_ids = drafts

    def _postprocess(
        self, batch: list[ScheduledSequence], rows: list[int], logits: torch.Tensor | None
    ) -> list[SequenceUpdate]:
        for s in batch:
            s.seq.num_computed_tokens += s.num_tokens - len(s.seq.draft_token_ids)
            if not s.seq.draft_token_ids:
                self.block_manager.commit_full_blocks(s.seq)
        if not rows:
            return []
        seqs = [batch[r].seq for r in rows]
        # Sequence i's logits: rows first[i] (its last token) to first[i] + its drafts.
        first, at = [], 0
        for seq in seqs:
            first.append(at)
            at += 1 + len(seq.draft_token_ids)
        outputs: list[list[TokenOutput]] = [[] for _ in seqs]
        finish: list[str | None] = [None] * len(seqs)
        kept = [0] * len(seqs)
        active = list(range(len(seqs)))
        depth = 0
        # Position by position: each sequence samples at its last token; one whose draft at a
        # depth equals the token sampled there samples again at that draft's row.
        while active:
            states = [seqs[i].state for i in active]
            allowed = [st.control.allowed_mask() if st.control else None for st in states]
            step_logits = logits if depth == 0 and len(active) == at else \
                logits[torch.tensor([first[i] + depth for i in active], device=logits.device)]
            samples = self.sampler(step_logits, [st.sampling for st in states], allowed=allowed)
            still = []
            for i, sample in zip(active, samples):
                seq = seqs[i]
                forced = self._accept(seq, sample, outputs[i])
                finish[i] = self._finish_reason(seq, outputs[i][-1].token_id)
                if finish[i] is None and forced:
                    finish[i] = self._force(seq, forced, outputs[i])
                drafts = seq.draft_token_ids
                if finish[i] is None and not forced and depth < len(drafts) and sample.token_id == drafts[depth]:
                    kept[i] += 1
                    still.append(i)
            active = still
            depth += 1
        updates = []
        for i, seq in enumerate(seqs):
            drafts = seq.draft_token_ids
            if drafts:
                self._kept_drafts(seq, len(drafts), kept[i], finished=finish[i] is not None)
            updates.append(self._update(seq, outputs[i], finish[i]))
        return updates

    def _kept_drafts(self, seq: Sequence, proposed: int, kept: int, *, finished: bool) -> None:
        """After a step with drafts: the kept ones are computed tokens now (the token sampled
        after them is not yet), the blocks of the rest go back, the drafter learns."""
        stats = self.spec_stats
        stats.verify_steps += 1
        stats.draft_tokens += proposed
        stats.accepted_tokens += kept
        stats.emitted_tokens += kept + 1
        seq.state.draft.feedback(proposed, kept)
        seq.draft_token_ids = []
        if finished:
            return
        if self.drafter is not None:  # the step computed the tokens before num_computed_tokens
            self.drafter.kept(seq.state.draft, seq.num_computed_tokens, proposed, kept)
        seq.num_computed_tokens += kept
        self.block_manager.commit_full_blocks(seq)
        self.block_manager.trim(seq, len(seq.token_ids))

    def _accept(self, seq: Sequence, sample, outputs: list[TokenOutput]) -> list[int]:
        """Add a sampled token to `seq` (and its output to `outputs`); returns the tokens its
        control forces next (usually none)."""
        st: _SeqState = seq.state
        token = sample.token_id
        outputs.append(self._add_token(seq, token, sample.logprob, sample.top_logprobs))
        if st.control is None or self._finish_reason(seq, token) is not None:
            return []
        return st.control.on_token(token)

    def _force(self, seq: Sequence, forced: list[int], outputs: list[TokenOutput]) -> str | None:
        """Add the tokens a control forced; the finish reason if one of them ends the sequence."""
        for token in forced:
            outputs.append(self._add_token(seq, token, None, None))
            finish = self._finish_reason(seq, token)
            if finish is not None:
                return finish
        return None

    def _update(self, seq: Sequence, outputs: list[TokenOutput], finish: str | None) -> SequenceUpdate:
        """The step's update for `seq`; a finished sequence releases what it holds."""
        st: _SeqState = seq.state
        if finish is not None:
            if not st.stop_matched:  # release what the detokenizer and stop matcher held back
                tail, st.stop_matched = st.stops.feed(st.detokenizer.flush())
                outputs[-1].text += tail if st.stop_matched else tail + st.stops.flush()
                finish = "stop" if st.stop_matched else finish
            self.scheduler.finish(seq, finish)
            seqs = self.requests.get(seq.request_id, [])
            if all(s.is_finished for s in seqs):
                self.requests.pop(seq.request_id, None)
        return SequenceUpdate(
            seq.request_id, seq.index, outputs, finish, seq.num_prompt_tokens, seq.num_cached_tokens
        )

    def _add_token(self, seq: Sequence, token: int, logprob, top_logprobs) -> TokenOutput:
        st: _SeqState = seq.state
        seq.token_ids.append(token)
        st.sampling.output_token_ids.append(token)
        if token in st.stop_ids:
            text = ""  # the end-of-turn token's own text is never shown
        else:
            text, st.stop_matched = st.stops.feed(st.detokenizer.add(token))
        return TokenOutput(token, text, logprob, top_logprobs)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        st: _SeqState = seq.state
        if token in st.stop_ids or st.stop_matched:
            return "stop"
        if seq.num_output_tokens >= seq.max_tokens:
            return "length"
        return None


def _check_multimodal(model: QwenForCausalLM, multimodal, num_prompt: int) -> None:
    from qwenkit.multimodal.image import ImageError

    if not getattr(model.config, "is_vision", False):
        raise ImageError(f"this model ({model.config.model_type}) does not read images; "
                         "use a vision-language checkpoint such as Qwen2.5-VL")
    if multimodal.num_prompt_tokens != num_prompt:
        raise ValueError(f"the multimodal prompt has {multimodal.num_prompt_tokens} positions for {num_prompt} tokens")


class StopStringMatcher:
    """Finds stop strings across token boundaries; holds back text that may begin one."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string matched)."""
        if not self.stop:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": 1 << 30}


def parse_memory(value: int | str) -> int:
    """Bytes from an int or a string such as "2GiB", "512MB", "1.5g"."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise QwenkitError(f"cannot read memory size {value!r} (examples: 2GiB, 512MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
