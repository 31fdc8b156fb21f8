"""What `--deterministic` (batch-invariant CPU steps) costs, measured side by side in one process.

Two engines on the same model, one with the switch; each measurement alternates between them
`--repeats` times and the median of each is reported with their ratio (deterministic / default):
- prefill: one prompt of `--prompt-tokens` random tokens, one token generated (seconds);
- decode at 1 and 8 streams: `--decode-tokens` tokens each after a short prompt (tokens/s).

    python benchmarks/bench_determinism.py [--model default] [--repeats 3] [--json]

Results, with the machine they came from, go in docs/determinism.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from qwenkit import LLM, SamplingParams
from qwenkit.kernels import summary


def prefill_seconds(llm: LLM, prompt_tokens: int, seed: int) -> float:
    rng = random.Random(seed)
    prompt = [rng.randrange(100, 20_000) for _ in range(prompt_tokens)]
    begun = time.perf_counter()
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    return time.perf_counter() - begun


def decode_tokens_per_s(llm: LLM, streams: int, decode_tokens: int, seed: int) -> float:
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 20_000) for _ in range(16)] for _ in range(streams)]
    params = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))  # prefill (cached after)
    begun = time.perf_counter()
    llm.generate(prompts, params)
    return streams * decode_tokens / (time.perf_counter() - begun)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    engines = {"default": LLM(args.model, progress=False, speculative="off"),
               "deterministic": LLM(args.model, progress=False, deterministic=True, speculative="off")}
    cases = {"prefill_s": lambda llm, seed: prefill_seconds(llm, args.prompt_tokens, seed),
             "decode_1_tok_s": lambda llm, seed: decode_tokens_per_s(llm, 1, args.decode_tokens, seed),
             "decode_8_tok_s": lambda llm, seed: decode_tokens_per_s(llm, 8, args.decode_tokens, seed)}
    for llm in engines.values():  # warm-up: kernels built, caches touched
        decode_tokens_per_s(llm, 1, 4, seed=-1)
    results = {}
    for case, measure in cases.items():
        runs = {name: [] for name in engines}
        for r in range(args.repeats):
            for name, llm in engines.items():
                runs[name].append(measure(llm, seed=r))  # the same prompts for both
        medians = {name: statistics.median(v) for name, v in runs.items()}
        results[case] = {"runs": runs, "median": medians,
                         "ratio": medians["deterministic"] / medians["default"]}
    if args.json:
        print(json.dumps({"kernels": summary(), "args": vars(args), "results": results}, indent=1))
        return
    print(f"kernels: {summary()}; model {args.model}; {args.repeats} alternating repeats")
    for case, r in results.items():
        print(f"{case:16s} default {r['median']['default']:9.3f}   deterministic {r['median']['deterministic']:9.3f}"
              f"   ratio {r['ratio']:.2f}")


if __name__ == "__main__":
    main()
