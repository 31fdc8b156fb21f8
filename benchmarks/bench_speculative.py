"""Speculative decoding (prompt lookup) against plain decoding, and against llama.cpp's own.

    python benchmarks/bench_speculative.py [--model default] [--workloads edit,chat] [--prompts 50]
        [--max-tokens 256] [--streams 1,8] [--llamacpp] [--json]
    python benchmarks/bench_speculative.py --verify-cost [--model default] [--k 4] [--steps 30]

The workloads are benchmarks/data/speculative_edit.jsonl (rewrite a function: add type hints
and a docstring, rename a variable, fix a marked bug; functions of CPython's standard library)
and speculative_chat.jsonl (questions with nothing to copy), made by
benchmarks/data/make_speculative_prompts.py. Every request is chat-templated and answered
greedily to its end of turn or --max-tokens.

One process holds two engines on the same model, `--speculative off` and `ngram`; each prompt
runs on both, alternating which goes first, and the run checks that both gave the same tokens.
At one stream the figure is generated tokens over wall time, prefill included, summed over the
prompts; at N streams, N prompts go in at once (one request each) and the figure is all their
tokens over the wall time of the batch. With --llamacpp, llama-cpp-python (not a qwenkit
dependency) runs the same file on the same token ids at one stream, plain and with its
`LlamaPromptLookupDecoding` (n-gram size 2, 10 drafts: its defaults), alternating with the
others; the last line gives each ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DATA = Path(__file__).parent / "data"


def load(workload: str, count: int) -> list[dict]:
    with open(DATA / f"speculative_{workload}.jsonl") as f:
        return [json.loads(line) for line in f][:count]


def run_qwenkit(llm, prompts: list[list[int]], params) -> tuple[list[list[int]], float]:
    begun = time.perf_counter()
    outputs = llm.generate(prompts, params)
    return [o.token_ids for o in outputs], time.perf_counter() - begun


def run_llamacpp(llama, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    begun = time.perf_counter()
    out = llama.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1, logprobs=None)
    tokens = llama.tokenize(out["choices"][0]["text"].encode(), add_bos=False, special=True)
    return tokens, time.perf_counter() - begun


def verify_cost(model: str, k: int, steps: int) -> dict:
    import statistics

    from qwenkit import LLM, SamplingParams
    from qwenkit.engine.model_runner import StepInput

    llm = LLM(model, progress=False)
    engine = llm.engine
    prompt = llm.tokenizer.encode("def merge_sort(items): return sorted(items) # the quick brown fox " * 40)[:256]
    engine.add_request("cost", prompt, SamplingParams(temperature=0, max_tokens=k + 8, ignore_eos=True))
    engine.step()  # the prompt
    seq = engine.requests["cost"][0]
    engine.block_manager.allocate(seq, len(seq.token_ids) + k)
    start, table = seq.num_computed_tokens, seq.block_table
    drafts = prompt[:k]

    def timed(rows: int) -> float:
        ids = (seq.token_ids[start:] + drafts)[:rows]
        step = StepInput([ids], [start], [table], [True], [rows - 1] if rows > 1 else None)
        begun = time.perf_counter()
        engine.runner.execute(step)
        return time.perf_counter() - begun

    one, verify = [], []
    for i in range(steps):
        for rows in ((1, k + 1) if i % 2 == 0 else (k + 1, 1)):
            (one if rows == 1 else verify).append(timed(rows))
    engine.abort("cost")
    a, b = statistics.median(one), statistics.median(verify)
    return {"model": llm.model_name, "k": k, "decode_step_ms": round(a * 1e3, 2), "verify_step_ms": round(b * 1e3, 2),
            "verify_over_decode": round(b / a, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--workloads", default="edit,chat")
    ap.add_argument("--prompts", type=int, default=50, help="the first N prompts of each workload")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--streams", default="1,8", help="comma-separated stream counts")
    ap.add_argument("--llamacpp", action="store_true", help="also llama.cpp, plain and with its prompt lookup")
    ap.add_argument("--speculative", default="ngram", help="the speculative engine's --speculative value")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--verify-cost", action="store_true", help="time a verify step of --k drafts against a decode step")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    if args.verify_cost:
        print(json.dumps(verify_cost(args.model, args.k, args.steps)))
        return

    from qwenkit import LLM, SamplingParams
    from qwenkit.model_files import resolve_model

    engines = {"off": LLM(args.model, speculative="off", progress=False),
               "ngram": LLM(args.model, speculative=args.speculative, progress=False)}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    llama = lookup = None
    if args.llamacpp:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        path = str(resolve_model(args.model).path)
        threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
        llama = Llama(path, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False)
        # Its drafts are checked against every position's logits: logits_all (else it fails).
        lookup = Llama(path, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False, logits_all=True,
                       draft_model=LlamaPromptLookupDecoding())
    results = []
    for workload in args.workloads.split(","):
        requests = load(workload, args.prompts)
        prompts = [engines["off"].prepare_chat(r["messages"], params).prompt_token_ids for r in requests]
        for streams in (int(s) for s in args.streams.split(",")):
            totals = {name: [0, 0.0] for name in engines}
            if streams == 1 and llama is not None:
                totals |= {"llama.cpp": [0, 0.0], "llama.cpp lookup": [0, 0.0]}
            mismatches = 0
            stats = engines["ngram"].engine.spec_stats
            before = (stats.draft_tokens, stats.accepted_tokens, stats.verify_steps, stats.emitted_tokens)
            for i in range(0, len(prompts), streams):
                group = prompts[i : i + streams]
                order = list(engines) if (i // streams) % 2 == 0 else list(reversed(engines))
                tokens = {}
                for name in order:
                    tokens[name], seconds = run_qwenkit(engines[name], group, params)
                    totals[name][0] += sum(map(len, tokens[name]))
                    totals[name][1] += seconds
                mismatches += sum(a != b for a, b in zip(tokens["off"], tokens["ngram"]))
                if streams == 1 and llama is not None:
                    for name, model in (("llama.cpp", llama), ("llama.cpp lookup", lookup)):
                        n, seconds = run_llamacpp(model, group[0], args.max_tokens)
                        totals[name][0] += len(n)
                        totals[name][1] += seconds
            speeds = {name: n / s for name, (n, s) in totals.items()}
            row = {"workload": workload, "streams": streams, "prompts": len(prompts),
                   "tok_s": {k: round(v, 1) for k, v in speeds.items()},
                   "ngram_vs_off": round(speeds["ngram"] / speeds["off"], 2),
                   "outputs_differ": mismatches}
            if "llama.cpp lookup" in speeds:
                row["ngram_vs_llamacpp_lookup"] = round(speeds["ngram"] / speeds["llama.cpp lookup"], 2)
                row["llamacpp_lookup_vs_plain"] = round(speeds["llama.cpp lookup"] / speeds["llama.cpp"], 2)
            drafted, kept, steps, emitted = (now - then for now, then in zip(
                (stats.draft_tokens, stats.accepted_tokens, stats.verify_steps, stats.emitted_tokens), before))
            row["acceptance"] = round(kept / max(drafted, 1), 3)
            row["tokens_per_verify_step"] = round(emitted / max(steps, 1), 2)
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
