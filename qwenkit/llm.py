"""`LLM`: load a Qwen-family checkpoint and generate from it with the batched engine."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qwenkit.chat import ChatChunk, ChatStream, PreparedChat, prepare_chat
from qwenkit.chat_types import ChatCompletion

from qwenkit.engine.llm_engine import EngineArgs, LLMEngine, SequenceUpdate, TokenOutput
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
    engine (see `EngineArgs`): the KV cache pool, the batch, the prefill chunk.
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
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 1024,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        quantization: str | None = "auto",
        compile: bool | None = None,
        progress: bool = True,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        files = resolve_model(model, progress=progress)
        loaded = load_model(files, dtype=self.dtype, device=self.device, quantization=quantization,
                            progress=progress)
        self.model = loaded.model
        self.config = loaded.config
        self.generation_config = loaded.generation_config
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        args = EngineArgs(
            max_model_len=max_model_len,
            kv_cache_memory=kv_cache_memory,
            kv_cache_dtype=kv_cache_dtype,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            compile=compile,
        )
        self.engine = LLMEngine(self.model, self.tokenizer, self.generation_config, device=self.device, args=args)
        self.max_model_len = self.engine.max_model_len
        self._request_ids = itertools.count()

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
        from qwenkit.structured import GrammarCompiler

        return GrammarCompiler(self.tokenizer, self.config.vocab_size)

    def prepare_chat(self, messages: list[dict[str, Any]], sampling_params: SamplingParams | None = None,
                     **kwargs: Any) -> PreparedChat:
        needs_grammar = kwargs.get("response_format") or kwargs.get("tool_choice", "auto") not in ("auto", "none")
        return prepare_chat(
            self.tokenizer, messages, sampling_params,
            grammar_compiler=self.grammar_compiler if needs_grammar else None, **kwargs,
        )

    def chat(
        self,
        messages: list[dict[str, Any]],
        sampling_params: SamplingParams | None = None,
        *,
        enable_thinking: bool = True,
        thinking_budget: int | None = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] = "auto",
        response_format: dict[str, Any] | None = None,
        parallel_tool_calls: bool = True,
        **template_kwargs: Any,
    ) -> ChatCompletion:
        """Answer a conversation: reasoning, content and tool calls apart, with usage.

        enable_thinking: Qwen3's thinking mode (`/think` and `/no_think` in the latest
        user turn switch it per turn). thinking_budget: the most thinking tokens before
        the model is told to answer (0: no thinking); separate from max_tokens, which
        counts every generated token. tools / tool_choice: OpenAI-style function tools;
        "required" or a named function is enforced by constrained decoding, as is
        response_format ({"type": "json_object"} or {"type": "json_schema", ...}).
        parallel_tool_calls=False holds "required" to a single call (a named function
        always gets exactly one).
        With n > 1, the first choice is returned: use chat_stream for all of them."""
        stream = ChatStream("", self.prepare_chat(
            messages, sampling_params, enable_thinking=enable_thinking, thinking_budget=thinking_budget,
            tools=tools, tool_choice=tool_choice, response_format=response_format,
            parallel_tool_calls=parallel_tool_calls, **template_kwargs,
        ))
        for _ in self._run_chat(stream):
            pass
        return stream.completions()[0]

    def chat_stream(
        self,
        messages: list[dict[str, Any]],
        sampling_params: SamplingParams | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatChunk]:
        """Like `chat`, yielding `ChatChunk`s (deltas of reasoning_content, content and
        tool_calls) as tokens are produced; concatenated they equal `chat`'s result."""
        stream = ChatStream("", self.prepare_chat(messages, sampling_params, **kwargs))
        yield from self._run_chat(stream)

    def _run_chat(self, stream: ChatStream) -> Iterator[ChatChunk]:
        p = stream.prepared
        stream.request_id = self.new_request_id()
        for update in self._stream(stream.request_id, p.prompt_token_ids, p.params, fallback=p.fallback,
                                   controls=p.controls):
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

