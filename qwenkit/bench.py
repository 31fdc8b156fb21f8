"""`qwenkit bench`: prefill and decode speed of the engine, time to first token with and
without a prefix-cache hit, and peak memory.

Every measurement runs `repeats` times and is reported as its median with min and max:
on a shared or throttled CPU one short sample varies several-fold (single-stream decode
read 0.6 to 43 tok/s over five one-sample runs on this project's busy 2-core machine),
so a spread that wide says "measure again", where a single figure would mislead.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field

from qwenkit import kernels
from qwenkit.errors import QwenkitError
from qwenkit.llm import LLM
from qwenkit.sampling import SamplingParams

_TEXT = (
    "def merge_sort(items):\n    if len(items) <= 1:\n        return items\n    middle = len(items) // 2\n"
    "    return merge(merge_sort(items[:middle]), merge_sort(items[middle:]))\n"
    "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。 "
)


@dataclass
class Measurement:
    """One figure's runs."""

    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def show(self, fmt: str) -> str:
        """'12.3' for one run, '12.3 (min 11.0, max 13.1)' for several."""
        if len(self.runs) == 1:
            return format(self.median, fmt)
        return f"{self.median:{fmt}} (min {min(self.runs):{fmt}}, max {max(self.runs):{fmt}})"

    def as_dict(self) -> dict:
        return {"median": self.median, "min": min(self.runs), "max": max(self.runs), "runs": self.runs}


@dataclass
class BenchResult:
    model: str
    dtype: str
    threads: int
    repeats: int
    prompt_tokens: int
    decode_tokens: int
    prefill_tok_s: Measurement
    ttft_uncached_s: Measurement
    ttft_cached_s: Measurement
    # per concurrency: {"concurrency", "aggregate_tok_s": Measurement, "per_stream_tok_s": Measurement}
    decode: list[dict] = field(default_factory=list)
    peak_rss_mb: int = 0
    kernels: str = ""  # which kernel variants ran (qwenkit.kernels.summary)
    speculative: str = ""  # what speculative decoding did in the run (empty when off)

    def table(self) -> str:
        share = self.ttft_cached_s.median / self.ttft_uncached_s.median
        runs = "1 run" if self.repeats == 1 else f"median of {self.repeats} runs (min, max)"
        lines = [
            f"model {self.model}  dtype {self.dtype}  threads {self.threads}  each figure: {runs}",
            f"prefill, {self.prompt_tokens}-token prompt: {self.prefill_tok_s.show('.1f')} tok/s",
            f"time to first token, {self.prompt_tokens}-token prompt: {self.ttft_uncached_s.show('.3f')} s",
            f"time to first token, same prompt prefix cached: {self.ttft_cached_s.show('.3f')} s "
            f"({share:.0%} of the uncached time)",
            f"decode, {self.decode_tokens} tokens per stream (tok/s):",
            f"  {'streams':>7}  {'all streams together':<32}  per stream",
        ]
        for d in self.decode:
            lines.append(f"  {d['concurrency']:>7}  {d['aggregate_tok_s'].show('.1f'):<32}  "
                         f"{d['per_stream_tok_s'].show('.1f')}")
        lines.append(self.kernels)
        if self.speculative:
            lines.append(self.speculative)
        lines.append(f"peak memory (RSS): {self.peak_rss_mb} MB")
        return "\n".join(lines)


def _prompt(llm: LLM, num_tokens: int, salt: int) -> list[int]:
    ids = llm.tokenizer.encode(f"{salt} " + _TEXT * (num_tokens // 40 + 2))
    return ids[:num_tokens]


def _time_first_token(llm: LLM, prompt: list[int]) -> float:
    start = time.perf_counter()
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1))
    return time.perf_counter() - start


def _decode(llm: LLM, concurrency: int, decode_tokens: int, salt: int) -> float:
    """Aggregate decode tok/s of `concurrency` streams, timed once all have their first token."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    ids = [f"bench-{salt}-{concurrency}-{i}" for i in range(concurrency)]
    for i, request_id in enumerate(ids):
        engine.add_request(request_id, _prompt(llm, 32, salt + 100 * concurrency + i), params)
    started: set[tuple[str, int]] = set()
    while len(started) < concurrency:  # prefill until every stream has its first token
        started.update((u.request_id, u.index) for u in engine.step())
    start = time.perf_counter()
    generated = 0
    while engine.has_unfinished_requests():
        generated += sum(len(u.outputs) for u in engine.step())
    return generated / (time.perf_counter() - start)


def _time_to_first_tokens(llm: LLM, prompt_tokens: int, salt: int) -> tuple[float, float]:
    """(uncached, cached): a new prompt, then the same long prefix with a new ending (all
    but the last partial block comes from the prefix cache)."""
    prompt = _prompt(llm, prompt_tokens, salt)
    uncached = _time_first_token(llm, prompt)
    cached = _time_first_token(llm, prompt[:-4] + _prompt(llm, 4, salt + 1))
    return uncached, cached


def run_bench(
    llm: LLM, *, prompt_tokens: int = 512, decode_tokens: int = 64, concurrency: tuple[int, ...] = (1, 4, 8, 16),
    repeats: int = 3,
) -> BenchResult:
    import torch

    llm.generate(_prompt(llm, 16, 0), SamplingParams(max_tokens=2))  # warm-up
    # A new salt per run: each uncached prompt really is uncached.
    ttfts = [_time_to_first_tokens(llm, prompt_tokens, 10 * run + 1) for run in range(repeats)]
    decode = []
    for c in concurrency:
        aggregate = [_decode(llm, c, decode_tokens, 1000 * (run + 1)) for run in range(repeats)]
        decode.append({"concurrency": c, "aggregate_tok_s": Measurement(aggregate),
                       "per_stream_tok_s": Measurement([a / c for a in aggregate])})
    return BenchResult(
        model=llm.model_name,
        dtype=str(llm.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        repeats=repeats,
        prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens,
        prefill_tok_s=Measurement([prompt_tokens / uncached for uncached, _ in ttfts]),
        ttft_uncached_s=Measurement([uncached for uncached, _ in ttfts]),
        ttft_cached_s=Measurement([cached for _, cached in ttfts]),
        decode=decode,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        kernels=kernels.summary(llm.device),
        speculative=_speculative_line(llm),
    )


def _speculative_line(llm: LLM) -> str:
    spec, stats = llm.engine.speculative, llm.engine.spec_stats
    if not spec.enabled:
        return ""
    return (f"speculative decoding ({spec.method}): {stats.draft_tokens} drafts checked, "
            f"{stats.acceptance_rate:.0%} kept, {stats.tokens_per_step:.2f} tokens a step where a sequence had drafts")


def as_dict(result: BenchResult) -> dict:
    """JSON-ready: each measurement as {"median", "min", "max", "runs"}."""
    def plain(value):
        if isinstance(value, Measurement):
            return value.as_dict()
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {name: plain(getattr(result, name)) for name in result.__dataclass_fields__}


@dataclass
class EmbedBenchResult:
    """`qwenkit bench --embed`: embeddings a second of `num_texts` texts of `num_tokens` tokens."""

    model: str
    dtype: str
    threads: int
    num_texts: int
    num_tokens: int
    embeddings_per_s: Measurement

    def line(self) -> str:
        return (f"{self.model} ({self.dtype}, {self.threads} threads): "
                f"{self.embeddings_per_s.show('.2f')} embeddings/s, {self.num_texts} texts of "
                f"{self.num_tokens} tokens a batch")


def run_embed_bench(llm: LLM, *, num_texts: int = 16, num_tokens: int = 256, repeats: int = 3) -> EmbedBenchResult:
    """What benchmarks/bench_embed.py measures for qwenkit, on a loaded model: each run embeds
    `num_texts` texts of `num_tokens` random token ids (plus the closing <|endoftext|>) in one
    call. Every run draws new texts, so no prefix-cache hit shortens it; one warm-up call
    first (kernels built, threads started)."""
    import torch

    from qwenkit.embedding import embed

    generator = torch.Generator().manual_seed(0)
    vocab = min(llm.tokenizer.vocab_size, 150000)  # below Qwen's special tokens

    def texts(n: int) -> list[list[int]]:
        return torch.randint(0, vocab, (n, num_tokens), generator=generator).tolist()

    embed(llm, texts(1))
    runs = []
    for _ in range(repeats):
        batch = texts(num_texts)
        start = time.perf_counter()
        embed(llm, batch)
        runs.append(num_texts / (time.perf_counter() - start))
    return EmbedBenchResult(model=llm.model_name, dtype=str(llm.dtype).removeprefix("torch."),
                            threads=torch.get_num_threads(), num_texts=num_texts, num_tokens=num_tokens,
                            embeddings_per_s=Measurement(runs))


@dataclass
class ImageBenchResult:
    """Time to first token of a chat turn with one `size` x `size` image (a new image each run: no
    cache hit), qwenkit beside transformers on the same checkpoint, runs alternating."""

    model: str
    size: int
    image_tokens: int
    prompt_tokens: int
    ttft_s: Measurement
    transformers_ttft_s: Measurement | None

    def line(self) -> str:
        text = (f"{self.model}: one {self.size}x{self.size} image ({self.image_tokens} image tokens of "
                f"{self.prompt_tokens}): time to first token {self.ttft_s.show('.3f')} s")
        if self.transformers_ttft_s is not None:
            ratio = self.transformers_ttft_s.median / self.ttft_s.median
            text += f"; transformers {self.transformers_ttft_s.show('.3f')} s ({ratio:.2f}x)"
        return text

    def as_dict(self) -> dict:
        return {"model": self.model, "size": self.size, "image_tokens": self.image_tokens,
                "prompt_tokens": self.prompt_tokens, "ttft_s": self.ttft_s.as_dict(),
                "transformers_ttft_s": self.transformers_ttft_s and self.transformers_ttft_s.as_dict()}


def _bench_image(size: int, seed: int):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def run_image_bench(llm: LLM, *, size: int = 1024, repeats: int = 3, transformers: bool = True) -> ImageBenchResult:
    """`qwenkit bench --image`: see `ImageBenchResult`. transformers: also time its forward pass over
    the same prompt and pixels (its `AutoModelForImageTextToText` on the checkpoint's folder)."""
    import torch

    if llm.image_processor is None:
        raise QwenkitError(f"{llm.model_name} does not read images: --image needs a vision-language model")

    def messages(image):
        return [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "Describe this image."}]}]

    reference = None
    if transformers:
        from transformers import AutoModelForImageTextToText

        reference = AutoModelForImageTextToText.from_pretrained(str(llm.files.path), dtype=llm.dtype).eval()
    llm.chat(messages(_bench_image(64, 0)), SamplingParams(max_tokens=1))  # warm-up
    ours, theirs, prepared = [], [], None
    for run in range(repeats):
        image = _bench_image(size, run + 1)
        start = time.perf_counter()
        llm.chat(messages(image), SamplingParams(temperature=0, max_tokens=1))
        ours.append(time.perf_counter() - start)
        if reference is not None:
            start = time.perf_counter()
            prepared = llm.prepare_chat(messages(image))  # the same pixels and ids: preprocessing counted
            mm = prepared.multimodal
            ids = torch.tensor([prepared.prompt_token_ids])
            with torch.inference_mode():
                reference(input_ids=ids, mm_token_type_ids=(ids == llm.config.image_token_id).int(),
                          pixel_values=torch.cat([i.pixel_values for i in mm.images]),
                          image_grid_thw=torch.tensor([i.grid_thw for i in mm.images]), logits_to_keep=1)
            theirs.append(time.perf_counter() - start)
    prepared = prepared or llm.prepare_chat(messages(_bench_image(size, 1)))
    return ImageBenchResult(llm.model_name, size, prepared.multimodal.images[0].num_tokens,
                            len(prepared.prompt_token_ids), Measurement(ours),
                            Measurement(theirs) if theirs else None)
