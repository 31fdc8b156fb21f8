"""Prefill and decode speed, and peak memory, of the single-sequence loop.

    python benchmarks/bench_core.py [--model default] [--dtype bfloat16] [--prompt-tokens 512] [--decode-tokens 64]

Each dtype given runs in its own process, so that peak RSS is that dtype's own. Also
reports how many greedy tokens each dtype agrees with float32 on a few fixed prompts.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain the difference between a list and a tuple in Python.",
    "What does the SQL statement SELECT COUNT(*) FROM users; return?",
    "Write a bash one-liner that counts the lines of every .py file in a folder.",
]


def measure(model: str, dtype: str, prompt_tokens: int, decode_tokens: int, repeats: int) -> dict:
    import torch

    from qwenkit import LLM, SamplingParams
    from qwenkit.models.attention import AttentionMetadata

    t0 = time.perf_counter()
    llm = LLM(model, dtype=dtype, progress=False, speculative="off")
    load_s = time.perf_counter() - t0
    text = " ".join(PROMPTS * 64)
    ids = llm.tokenizer.encode(text)[:prompt_tokens]

    prefill = []
    with torch.inference_mode():
        for _ in range(repeats):
            kv = llm.model.allocate_kv_cache(len(ids))
            meta = AttentionMetadata.contiguous(start=0, num_tokens=len(ids))
            t = time.perf_counter()
            llm.model.compute_logits(llm.model(torch.tensor(ids), torch.arange(len(ids)), kv, meta)[-1:])
            prefill.append(len(ids) / (time.perf_counter() - t))

    decode = []
    params = SamplingParams(temperature=0, max_tokens=decode_tokens + 1, ignore_eos=True)
    short = ids[:32]
    for _ in range(repeats):
        stream = llm.stream(short, params)
        next(stream)  # the first token comes from the prefill
        t = time.perf_counter()
        n = sum(1 for _ in stream)
        decode.append(n / (time.perf_counter() - t))

    greedy = []
    for p in PROMPTS:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))[0]
        greedy.append(out.token_ids)
    return {
        "dtype": dtype,
        "load_s": round(load_s, 1),
        "prompt_tokens": len(ids),
        "prefill_tok_s": round(sorted(prefill)[len(prefill) // 2], 1),
        "decode_tok_s": round(sorted(decode)[len(decode) // 2], 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "greedy": greedy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", action="append", help="repeatable; default: float32 and bfloat16")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtypes = args.dtype or ["float32", "bfloat16"]
    if args.worker:
        print(json.dumps(measure(args.model, dtypes[0], args.prompt_tokens, args.decode_tokens, args.repeats)))
        return
    results = []
    for dtype in dtypes:
        cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--dtype", dtype,
               "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens),
               "--repeats", str(args.repeats)]
        results.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    reference = next((r["greedy"] for r in results if r["dtype"] == "float32"), None)
    print(f"model: {args.model}; threads: {__import__('torch').get_num_threads()}")
    print(f"{'dtype':<10}{'load s':>8}{'prefill tok/s':>15}{'decode tok/s':>14}{'peak RSS MB':>13}  greedy agreement with float32")
    for r in results:
        agree = ""
        if reference is not None:
            agree = ", ".join(str(_agreement(a, b)) for a, b in zip(r["greedy"], reference))
            agree += f" of {len(reference[0])} tokens"
        print(f"{r['dtype']:<10}{r['load_s']:>8}{r['prefill_tok_s']:>15}{r['decode_tok_s']:>14}{r['peak_rss_mb']:>13}  {agree}")
    print(f"prefill prompt: {results[0]['prompt_tokens']} tokens; decode: {args.decode_tokens} tokens after a 32-token prompt")


def _agreement(a: list[int], b: list[int]) -> int:
    """Tokens until the first divergence."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


if __name__ == "__main__":
    main()
