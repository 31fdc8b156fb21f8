"""Where a bfloat16 embedding's time goes: qwenkit's kernel entries and attention, timed.

    python benchmarks/profile_embed_step.py [--layers 4] [--texts 4] [--rounds 3]

Random weights of Qwen3-Embedding-0.6B's shape (as bench_embed.py, `--layers` deep) embed
`--texts` texts of 257 tokens; each entry of `qwenkit.kernels` that a bfloat16 prefill calls
(`linear`, `rms_norm`, `add_rms_norm`, `qk_norm_rope_cache`, `silu_and_mul`) and the model's
`attention` is wrapped with a timer. The fastest round's times are printed, with what is left
("other": the embedding lookup, step preparation, Python). The C kernels do not show in torch's
profiler (ctypes calls are not aten ops); timers see them. Run it with PYTHONPATH pointing at
another checkout to compare trees.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import qwenkit  # noqa: F401 - before torch: its OpenMP settings (docs/decode.md#threads)
import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from bench_embed import random_texts, write_checkpoint

    import qwenkit.models.layers as layers
    from qwenkit import LLM, kernels
    from qwenkit.embedding import embed

    seconds: dict[str, float] = collections.defaultdict(float)

    def timed(module, name: str) -> None:
        fn = getattr(module, name)

        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[name] += time.perf_counter() - start
        setattr(module, name, wrapper)

    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), args.layers)
        llm = LLM(tmp, dtype="bfloat16", progress=False, enable_prefix_caching=False)
        prompts = random_texts(args.texts, 256, llm.tokenizer.token_to_id("<|endoftext|>")).tolist()
        for name in ("linear", "rms_norm", "add_rms_norm", "qk_norm_rope_cache", "silu_and_mul"):
            timed(kernels, name)
        timed(layers, "attention")  # the model's attention (SDPA per prompt for a pooling step)
        embed(llm, prompts[:1])  # warm up
        best = None
        for _ in range(args.rounds):
            seconds.clear()
            start = time.perf_counter()
            embed(llm, prompts)
            total = time.perf_counter() - start
            if best is None or total < best[0]:
                best = total, dict(seconds)
    total, parts = best
    print(f"{qwenkit.__file__}: {args.texts} texts x 257 tokens, {args.layers} layers, bfloat16, "
          f"{torch.get_num_threads()} threads: {total:.3f} s (fastest of {args.rounds})")
    for name, s in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {name:20s} {s:7.3f} s {100 * s / total:5.1f}%")
    other = total - sum(parts.values())
    print(f"  {'other':20s} {other:7.3f} s {100 * other / total:5.1f}%")


if __name__ == "__main__":
    main()
