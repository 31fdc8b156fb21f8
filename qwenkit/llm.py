"""`LLM`: load a Qwen-family checkpoint and generate from it with the batched engine."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qwenkit.capabilities import TASKS
from qwenkit.chat.prepare import PreparedChat, prepare_chat
from qwenkit.chat.request import ChatRequest, chat_request
from qwenkit.chat.stream import ChatStream
from qwenkit.chat.types import ChatChunk, ChatCompletion

from qwenkit.distributed import ParallelConfig
from qwenkit.engine.llm_engine import EngineArgs, LLMEngine, SequenceUpdate, TokenOutput
from qwenkit.engine.model_runner import ModelRunner
from qwenkit.engine.speculative import SpeculativeConfig
from qwenkit.engine.threads import set_threads
from qwenkit.errors import QwenkitError
from qwenkit.loader import load_model
from qwenkit.model_files import resolve_model
from qwenkit.sampling import SamplingDefaults, SamplingParams

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CompletionOutput:
    """One of a request's n completions."""

    index: int
    text: str
    token_ids: list[int]
    # "stop" (end of turn, a stop string or stop token), "length" (max_tokens or the
    # context is full) or "abort".
    finish_reason: str | None
    # With SamplingParams(logprobs=True): per token, its logprob and top_logprobs.
    logprobs: list[TokenOutput] | None = None


@dataclass
class RequestOutput:
    """The result of one prompt. `.text`, `.token_ids`, `.finish_reason` are those of the
    first completion; `.outputs` holds all n."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute dtype. Unset: bfloat16 on CUDA and on CPUs with native bfloat16 matmuls
    (AMX or AVX512-BF16), else float32 — measured in docs/benchmarks.md: without them
    bfloat16 is emulated and ~5x slower than float32 to prefill."""
    if dtype is None or dtype == "auto":
        if device.type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise QwenkitError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}") from None


@functools.cache
def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QwenkitError("device 'cuda' was asked for but no CUDA device is available")
    return device


class LLM:
    """A loaded model with its tokenizer and engine, ready to generate.

    model: "default" (the embedded Qwen2.5-Coder-0.5B-Instruct GGUF), a Hugging Face
    folder, a `.gguf` file, or a Hugging Face repo id. dtype: "float32", "bfloat16" or
    "float16" (default: bfloat16 where the hardware computes it natively, else float32).
    device: "cpu" or "cuda" (default: cuda when present). The keyword arguments size the
    engine (see `EngineArgs`): the KV cache pool and its dtype, the batch, the prefill chunk.
    tensor_parallel_size: split the model over this many processes (CUDA: one GPU each,
    from `device` on; CPU: the cores shared), started here and stopped by `shutdown()`;
    enable_expert_parallel: Qwen3-MoE experts dealt out whole to the ranks. One such model
    per process (docs/scale.md). threads: CPU threads of torch and the C kernels, for the
    whole process (default: the cores this process may run on, its affinity mask and cgroup
    CPU quota, or OMP_NUM_THREADS when set; docs/decode.md#threads). task: "generate",
    "embed" or "rerank" in place of what the checkpoint is read as (qwenkit.capabilities).
    speculative: speculative decoding, which changes no output: "ngram" (prompt lookup, the
    default: it drafts only where the prompt or output repeats, and backs off where drafts
    miss), "ngram:K", "draft:MODEL" (a smaller model with the same tokenizer, loaded here), or
    "off" / None (docs/speculative.md).
    """

    def __init__(
        self,
        model: str | None = "default",
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        *,
        max_model_len: int | None = None,
        kv_cache_memory: int | str | None = None,
        kv_cache_dtype: str | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        quantization: str | None = "auto",
        compile: bool | None = None,
        enforce_eager: bool = False,
        deterministic: bool = False,
        speculative: str | SpeculativeConfig | None = "ngram",
        tensor_parallel_size: int = 1,
        enable_expert_parallel: bool = False,
        progress: bool = True,
        threads: int | None = None,
        task: str | None = None,
    ):
        if task is not None and task not in TASKS:  # before anything loads
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        spec = SpeculativeConfig.parse(speculative)  # a wrong value fails before anything loads
        self.task = task  # None: what the checkpoint is (qwenkit.capabilities); "rerank" etc. overrides it
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        files = resolve_model(model, progress=progress)
        parallel = ParallelConfig(tensor_parallel_size, enable_expert_parallel)
        self.executor = None
        if parallel.tensor_parallel_size > 1:
            from qwenkit.distributed.executor import TensorParallelExecutor

            self.executor = TensorParallelExecutor(files, dtype=self.dtype, device=self.device, parallel=parallel,
                                                   load_model=load_model)
        try:
            if self.device.type == "cpu" or threads is not None:  # loading computes too (packing, dequantizing)
                set_threads(threads)
            loaded = load_model(files, dtype=self.dtype, device=self.device, quantization=quantization,
                                progress=progress, tp=self.executor and self.executor.tp)
        except BaseException:
            self.shutdown()
            raise
        self.model = loaded.model
        self.config = loaded.config
        self.generation_config = loaded.generation_config
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.files = files
        self.pooling = loaded.pooling  # a GGUF's pooling_type ("last": an embedding model), else None
        args = EngineArgs(
            max_model_len=max_model_len,
            kv_cache_memory=kv_cache_memory,
            kv_cache_dtype=kv_cache_dtype,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            compile=compile,
            enforce_eager=enforce_eager,
            deterministic=deterministic,
            speculative=spec,
        )
        try:
            draft_model = self._load_draft_model(args.speculative, quantization, progress)
            self.engine = LLMEngine(self.model, self.tokenizer, self.generation_config, device=self.device,
                                    args=args, runner_factory=self.executor.make_runner if self.executor else ModelRunner,
                                    draft_model=draft_model)
        except BaseException:
            self.shutdown()
            raise
        self.max_model_len = self.engine.max_model_len
        self._request_ids = itertools.count()
        # Images in chat messages (vision-language models): the limits each is decoded under, and
        # whether an image part may name a local file (yes for a user's own process; the server's
        # protocols pass only data: URLs and fetched bytes).
        from qwenkit.multimodal.image import ImageLimits

        self.image_limits = ImageLimits()
        self.read_image_files = True

    def _load_draft_model(self, spec: SpeculativeConfig, quantization: str | None, progress: bool):
        """The draft model of speculative="draft:MODEL", on this model's device and dtype; its
        tokenizer must be this model's (a draft token is checked as the same token)."""
        if spec.method != "draft":
            return None
        loaded = load_model(resolve_model(spec.draft_model, progress=progress), dtype=self.dtype, device=self.device,
                            quantization=quantization, progress=progress)
        ours, theirs = self.tokenizer.backend, loaded.tokenizer.backend
        if ours.get_vocab(with_added_tokens=True) != theirs.get_vocab(with_added_tokens=True):
            raise QwenkitError(f"the draft model {spec.draft_model} has another tokenizer than {self.model_name} "
                               f"({theirs.get_vocab_size()} against {ours.get_vocab_size()} tokens, not all the same "
                               "ids): a draft model must share "
                               "the model's tokenizer (Qwen3-0.6B drafts for the Qwen3 family)")
        return loaded.model

    def shutdown(self) -> None:
        """Stop the worker processes of a tensor-parallel model (a no-op otherwise)."""
        if self.executor is not None:
            self.executor.shutdown()

    def check_health(self) -> None:
        """Raise EngineDeadError if a rank of a tensor-parallel model is gone."""
        if self.executor is not None:
            self.executor.check()

    def new_request_id(self) -> str:
        return f"req-{next(self._request_ids)}"

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate completions for all prompts (strings, or lists of token ids) as one batch."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        param_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(param_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(param_list)} sampling_params")
        outputs: dict[str, RequestOutput] = {}
        try:
            for prompt, p in zip(prompts, param_list):
                prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
                request_id = self.new_request_id()
                self.engine.add_request(request_id, prompt_ids, p)
                outputs[request_id] = RequestOutput(
                    request_id,
                    prompt if isinstance(prompt, str) else None,
                    prompt_ids,
                    [CompletionOutput(i, "", [], None, [] if p.logprobs else None) for i in range(p.n)],
                )
            while self.engine.has_unfinished_requests():
                for update in self.engine.step():
                    _apply(outputs[update.request_id], update)
        finally:
            for request_id in outputs:
                self.engine.abort(request_id)
        return list(outputs.values())

    @functools.cached_property
    def grammar_compiler(self):
        """Structured output for this model's vocabulary (built on first use)."""
        from qwenkit.chat.structured import GrammarCompiler

        # Every end-of-turn id: Qwen2.5 ends a tool-call turn with <|endoftext|>, not <|im_end|>.
        return GrammarCompiler(self.tokenizer, self.config.vocab_size,
                               eos_token_ids=self.generation_config.eos_token_ids or None)

    def prepare_chat(self, messages: list[dict[str, Any]] | ChatRequest,
                     sampling_params: SamplingParams | None = None, **options: Any) -> PreparedChat:
        """The engine inputs of a chat request (arguments as for `chat`)."""
        request = chat_request(messages, sampling_params, **options)
        request, images = self._images_of(request)
        prepared = prepare_chat(self.tokenizer, request,
                                grammar_compiler=self.grammar_compiler if request.needs_grammar else None)
        if images:
            from qwenkit.multimodal import build_multimodal_prompt

            ids, multimodal = build_multimodal_prompt(prepared.prompt_token_ids, images,
                                                      image_token_id=self.config.image_token_id,
                                                      merge_size=self.image_processor.merge_size)
            prepared = dataclasses.replace(prepared, prompt_token_ids=ids, multimodal=multimodal)
        return prepared

    @functools.cached_property
    def image_processor(self):
        """The vision processor of a vision-language model (its preprocessor_config.json), else None."""
        if not self.config.is_vision:
            return None
        from qwenkit.config import read_json
        from qwenkit.multimodal import ImageProcessor

        vision = self.model.vision_config
        path = self.files.path / "preprocessor_config.json" if self.files.format != "gguf" else None
        return ImageProcessor.from_hf(read_json(path) if path is not None and path.exists() else {},
                                      patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                                      merge_size=vision.spatial_merge_size)

    def _images_of(self, request: ChatRequest) -> tuple[ChatRequest, list]:
        """The request with its image parts made template placeholders, and the images preprocessed
        (decoded under `image_limits`; a local path is read here, as the caller is the user)."""
        from qwenkit.multimodal.chat import extract_images, has_images

        if not has_images(request.messages):
            return request, []
        from qwenkit.multimodal import ImageError, ImageInput, load_image_source

        if self.image_processor is None:
            raise ImageError(f"this model ({self.config.model_type}) does not read images; "
                             "use a vision-language checkpoint such as Qwen2.5-VL")
        messages, sources = extract_images(request.messages)
        if len(sources) > self.image_limits.max_images:
            raise ImageError(f"the request has {len(sources)} images; the limit is {self.image_limits.max_images}")
        images = [ImageInput.from_image(load_image_source(s, self.image_limits, allow_files=self.read_image_files),
                                        self.image_processor) for s in sources]
        return dataclasses.replace(request, messages=messages), images

    def chat(self, messages: list[dict[str, Any]] | ChatRequest, sampling_params: SamplingParams | None = None,
             **options: Any) -> ChatCompletion:
        """Answer a conversation: reasoning, content and tool calls apart, with usage.

        Pass a `ChatRequest`, or the messages with its other fields as keywords:
        enable_thinking (Qwen3's thinking mode; `/think` and `/no_think` in the latest user
        turn switch it per turn), thinking_budget (the most thinking tokens before the
        model is told to answer; 0: no thinking; separate from max_tokens, which counts
        every generated token), tools / tool_choice (OpenAI-style function tools;
        "required" or a named function is enforced by constrained decoding, as is
        response_format: {"type": "json_object"} or {"type": "json_schema", ...}),
        parallel_tool_calls (False holds "required" to a single call; a named function
        always gets exactly one), chat_template_kwargs. Any other keyword is a chat
        template variable.
        With n > 1, the first choice is returned: use chat_stream for all of them."""
        stream = ChatStream("", self.prepare_chat(messages, sampling_params, **options))
        for _ in self._run_chat(stream):
            pass
        return stream.completions()[0]

    def chat_stream(self, messages: list[dict[str, Any]] | ChatRequest,
                    sampling_params: SamplingParams | None = None, **options: Any) -> Iterator[ChatChunk]:
        """Like `chat`, yielding `ChatChunk`s (deltas of reasoning_content, content and
        tool_calls) as tokens are produced; concatenated they equal `chat`'s result."""
        stream = ChatStream("", self.prepare_chat(messages, sampling_params, **options))
        yield from self._run_chat(stream)

    def _run_chat(self, stream: ChatStream) -> Iterator[ChatChunk]:
        p = stream.prepared
        stream.request_id = self.new_request_id()
        for update in self._stream(stream.request_id, p.prompt_token_ids, p.params, fallback=p.fallback,
                                   controls=p.controls, multimodal=p.multimodal):
            yield stream.apply(update)

    def stream(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        fallback: SamplingDefaults | None = None,
        **request_kwargs,
    ) -> Iterator[SequenceUpdate]:
        """Generate one request token by token: yields each step's `SequenceUpdate`.

        Parameters left unset come from generation_config.json, then `fallback`."""
        yield from self._stream(self.new_request_id(), prompt_token_ids, sampling_params, fallback=fallback,
                                **request_kwargs)

    def embed(self, texts: str | Sequence[str | list[int]], *, instruction: str | None = None,
              dimensions: int | None = None) -> list[list[float]]:
        """Qwen3-Embedding's embeddings of `texts` (or token-id lists): last-token pooling,
        L2-normalised; `instruction` embeds them as queries of that task, `dimensions` keeps
        the first d values (renormalised). See qwenkit/embedding.py."""
        from qwenkit import embedding

        return embedding.embed(self, texts, instruction=instruction, dimensions=dimensions).tolist()

    def score(self, query: str, documents: str | Sequence[str], *, instruction: str | None = None) -> list[float]:
        """Qwen3-Reranker's relevance of each document to `query`: P("yes"), in [0, 1]."""
        from qwenkit import embedding

        return embedding.score(self, query, documents, instruction=instruction).data

    def _stream(self, request_id: str, prompt_token_ids, sampling_params, **request_kwargs) -> Iterator[SequenceUpdate]:
        self.engine.add_request(request_id, prompt_token_ids, sampling_params, **request_kwargs)
        try:
            while self.engine.has_unfinished_requests():
                for update in self.engine.step():
                    if update.request_id == request_id:
                        yield update
        finally:
            self.engine.abort(request_id)


def _apply(output: RequestOutput, update: SequenceUpdate) -> None:
    completion = output.outputs[update.index]
    completion.token_ids.extend(t.token_id for t in update.outputs)
    completion.text += "".join(t.text for t in update.outputs)
    if completion.logprobs is not None:
        completion.logprobs.extend(update.outputs)
    completion.finish_reason = update.finish_reason
    output.num_cached_tokens = update.num_cached_tokens

