"""`LLM`: load a Qwen-family checkpoint and generate from it.

This is the single-sequence loop with a KV cache; the batched engine goes behind the
same API later.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from qwenkit.errors import ContextLengthError, QwenkitError
from qwenkit.loader import load_model
from qwenkit.model_files import resolve_model
from qwenkit.models.attention import AttentionMetadata
from qwenkit.sampling import SamplingDefaults, SamplingParams, make_generator, sample
from qwenkit.tokenizer import IncrementalDetokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RequestOutput:
    """The result of one prompt."""

    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    # "stop" (end of turn, a stop string or stop token) or "length" (max_tokens or context full).
    finish_reason: str


@dataclass(frozen=True)
class GenerationStep:
    """One generated token, the text it completes (may be empty while text is held back),
    and the finish reason once the request is done."""

    token_id: int
    text: str
    finish_reason: str | None


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
    """A loaded model with its tokenizer, ready to generate.

    model: "default" (the embedded Qwen2.5-Coder-0.5B-Instruct GGUF), a Hugging Face
    folder, a `.gguf` file, or a Hugging Face repo id. dtype: "float32", "bfloat16" or
    "float16" (default: bfloat16 where the hardware computes it natively, else float32).
    device: "cpu" or "cuda" (default: cuda when present).
    """

    def __init__(
        self,
        model: str | None = "default",
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        *,
        max_model_len: int | None = None,
        progress: bool = True,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        files = resolve_model(model, progress=progress)
        loaded = load_model(files, dtype=self.dtype, device=self.device, progress=progress)
        self.model = loaded.model
        self.config = loaded.config
        self.generation_config = loaded.generation_config
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate a completion for each prompt (a string, or a list of token ids)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        param_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(param_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(param_list)} sampling_params")
        outputs = []
        for prompt, p in zip(prompts, param_list):
            prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            token_ids, pieces, finish = [], [], None
            for step in self.stream(prompt_ids, p):
                token_ids.append(step.token_id)
                pieces.append(step.text)
                finish = step.finish_reason
            outputs.append(
                RequestOutput(
                    prompt=prompt if isinstance(prompt, str) else None,
                    prompt_token_ids=prompt_ids,
                    text="".join(pieces),
                    token_ids=token_ids,
                    finish_reason=finish,
                )
            )
        return outputs

    def check_prompt_length(self, num_prompt_tokens: int) -> None:
        if num_prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        if num_prompt_tokens >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt is {num_prompt_tokens} tokens, but the model's context is "
                f"{self.max_model_len} tokens (and at least one must be left to generate)"
            )

    @torch.inference_mode()
    def stream(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        fallback: SamplingDefaults | None = None,
    ) -> Iterator[GenerationStep]:
        """Generate token by token; each step carries the text it completes.

        Parameters left unset come from generation_config.json, then `fallback`."""
        self.check_prompt_length(len(prompt_token_ids))
        if max(prompt_token_ids) >= self.config.vocab_size or min(prompt_token_ids) < 0:
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        params = sampling_params.resolved(self.generation_config, fallback)
        budget = self.max_model_len - len(prompt_token_ids)
        max_tokens = budget if params.max_tokens is None else min(params.max_tokens, budget)
        stop_ids = set() if params.ignore_eos else set(self.generation_config.eos_token_ids)
        stop_ids |= set(params.stop_token_ids)
        generator = make_generator(params.seed, self.device)
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True)
        stops = _StopStringMatcher(params.stop)

        kv_caches = self.model.allocate_kv_cache(min(len(prompt_token_ids) + max_tokens, 256 + len(prompt_token_ids)))
        input_ids = torch.tensor(prompt_token_ids, device=self.device)
        start = 0
        for i in range(max_tokens):
            num_slots = kv_caches[0][0].shape[0]
            if start + len(input_ids) > num_slots:
                kv_caches = _grow(kv_caches, min(2 * num_slots, len(prompt_token_ids) + max_tokens))
            meta = AttentionMetadata.contiguous(start=start, num_tokens=len(input_ids))
            positions = torch.arange(start, start + len(input_ids), device=self.device)
            hidden = self.model(input_ids, positions, kv_caches, meta)
            logits = self.model.compute_logits(hidden[-1:])[0]
            token = sample(logits, params, generator)
            start += len(input_ids)
            input_ids = torch.tensor([token], device=self.device)

            if token in stop_ids:
                text, _ = stops.feed(detok.flush())
                yield GenerationStep(token, text + stops.flush(), "stop")
                return
            text, matched = stops.feed(detok.add(token))
            if not matched and i == max_tokens - 1:
                tail, matched = stops.feed(detok.flush())
                text += tail if matched else tail + stops.flush()
                yield GenerationStep(token, text, "stop" if matched else "length")
                return
            yield GenerationStep(token, text, "stop" if matched else None)
            if matched:
                return


def _grow(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], num_slots: int):
    """A larger contiguous cache holding the same entries."""
    grown = []
    for k, v in kv_caches:
        k2 = k.new_zeros((num_slots, *k.shape[1:]))
        v2 = v.new_zeros((num_slots, *v.shape[1:]))
        k2[: k.shape[0]] = k
        v2[: v.shape[0]] = v
        grown.append((k2, v2))
    return grown


class _StopStringMatcher:
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
