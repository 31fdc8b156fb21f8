"""`qwenkit bench`: prefill and decode speed of the engine, time to first token with and
without a prefix-cache hit, and peak memory."""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field

from qwenkit import kernels
from qwenkit.llm import LLM
from qwenkit.sampling import SamplingParams

_TEXT = (
    "def merge_sort(items):\n    if len(items) <= 1:\n        return items\n    middle = len(items) // 2\n"
    "    return merge(merge_sort(items[:middle]), merge_sort(items[middle:]))\n"
    "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。 "
)


@dataclass
class BenchResult:
    model: str
    dtype: str
    threads: int
    prompt_tokens: int
    prefill_tok_s: float
    ttft_uncached_s: float
    ttft_cached_s: float
    decode: list[dict] = field(default_factory=list)  # per concurrency: aggregate and per-stream tok/s
    peak_rss_mb: int = 0
    kernels: str = ""  # which kernel variants ran (qwenkit.kernels.summary)

    def table(self) -> str:
        lines = [
            f"model {self.model}  dtype {self.dtype}  threads {self.threads}",
            self.kernels,
            f"prefill: {self.prefill_tok_s:.1f} tok/s ({self.prompt_tokens}-token prompt)",
            f"time to first token: {self.ttft_uncached_s:.3f} s uncached, {self.ttft_cached_s:.3f} s with the "
            f"prompt's prefix cached ({self.ttft_cached_s / self.ttft_uncached_s:.0%})",
            "decode: concurrency  aggregate tok/s  per stream tok/s",
        ]
        for d in self.decode:
            row = f"{d['concurrency']:>11}  {d['aggregate_tok_s']:>15.1f}  {d['per_stream_tok_s']:>16.1f}"
            lines.append(" " * 8 + row)
        lines.append(f"peak RSS: {self.peak_rss_mb} MB")
        return "\n".join(lines)


def _prompt(llm: LLM, num_tokens: int, salt: int) -> list[int]:
    ids = llm.tokenizer.encode(f"{salt} " + _TEXT * (num_tokens // 40 + 2))
    return ids[:num_tokens]


def _time_first_token(llm: LLM, prompt: list[int]) -> float:
    start = time.perf_counter()
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1))
    return time.perf_counter() - start


def _decode(llm: LLM, concurrency: int, decode_tokens: int) -> dict:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    ids = [f"bench-{concurrency}-{i}" for i in range(concurrency)]
    for i, request_id in enumerate(ids):
        engine.add_request(request_id, _prompt(llm, 32, 1000 + 100 * concurrency + i), params)
    started: set[tuple[str, int]] = set()
    while len(started) < concurrency:  # prefill until every stream has its first token
        started.update((u.request_id, u.index) for u in engine.step())
    start = time.perf_counter()
    generated = 0
    while engine.has_unfinished_requests():
        generated += sum(len(u.outputs) for u in engine.step())
    elapsed = time.perf_counter() - start
    aggregate = generated / elapsed
    return {"concurrency": concurrency, "aggregate_tok_s": aggregate, "per_stream_tok_s": aggregate / concurrency}


def run_bench(
    llm: LLM, *, prompt_tokens: int = 512, decode_tokens: int = 64, concurrency: tuple[int, ...] = (1, 4, 8, 16)
) -> BenchResult:
    import torch

    llm.generate(_prompt(llm, 16, 0), SamplingParams(max_tokens=2))  # warm-up
    uncached = _time_first_token(llm, _prompt(llm, prompt_tokens, 1))
    # The same long prefix again with a new ending: all but the last partial block is cached.
    cached_prompt = _prompt(llm, prompt_tokens, 1)[:-4] + _prompt(llm, 4, 2)
    cached = _time_first_token(llm, cached_prompt)
    return BenchResult(
        model=llm.model_name,
        dtype=str(llm.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        prompt_tokens=prompt_tokens,
        prefill_tok_s=prompt_tokens / uncached,
        ttft_uncached_s=uncached,
        ttft_cached_s=cached,
        decode=[_decode(llm, c, decode_tokens) for c in concurrency],
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        kernels=kernels.summary(llm.device),
    )


def as_dict(result: BenchResult) -> dict:
    return asdict(result)
