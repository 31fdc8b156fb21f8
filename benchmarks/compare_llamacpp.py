"""qwenkit against llama.cpp, side by side, on the same GGUF, token ids and thread count.

    python benchmarks/compare_llamacpp.py [--model default] [--threads 2] [--repeats 3] [--json]

Figures, each as medians over `--repeats` runs with the ratio qwenkit / llama.cpp:
single-stream decode tok/s, prefill tok/s (a `--prompt-tokens` prompt), aggregate decode
tok/s at `--streams` concurrent streams (and each engine's N-stream / 1-stream scaling),
peak RSS; once per engine: greedy agreement (tokens until the first divergence) on the
chat prompts of bench_core.py, perplexity on a fixed text, and a batch workload.

The batch workload is the serving case: `--batch-prompts` code questions (chat-templated),
each answered greedily to its end of turn or `--batch-tokens`, wall time for all of them.
qwenkit gets them all at once, one request each, and runs up to its default max_num_seqs (32 on
CPU; `--batch-seqs`) at a time, its pool sized to hold every sequence, so nothing is
preempted; llama.cpp answers them one at a time, as a single-stream server does. The tasks
are benchmarks/data/code_tasks.txt: 164 (HumanEval's count), the full workload being
`--batch-prompts 164 --batch-tokens 512`. The figure is llama.cpp's seconds / qwenkit's (the
engine issue's target: >= 2.5x on the full workload).

Every run is its own subprocess, alternating qwenkit, llama.cpp, qwenkit, ..., so that
peak RSS and thread pools are each engine's own. The speed runs and the quality run
(greedy, perplexity: full-vocabulary logits for every token) are separate processes, so
the quality run's logits do not inflate the speed runs' RSS. The prompts are tokenized
once, by qwenkit's tokenizer, and both engines get the same ids.

The report names what ran on each side: the CPU's instruction-set flags, qwenkit's kernel
variants (`qwenkit.kernels.describe()`: the ISA its C kernels were built for, which path each
kernel takes) and llama.cpp's build (`llama_print_system_info()`).

The qwenkit side is `qwenkit bench`'s own measurement (`qwenkit.bench`): prefill is the
time to the first token of an uncached prompt; decode is timed after every stream has its
first token. The llama.cpp side does the same through llama-cpp-python's low-level C API:
one context whose KV cache holds `--ctx` tokens shared by up to `--streams` sequences,
prompt batches of n_batch tokens, and N-stream decode as one `llama_batch` holding one
token of each of the N sequence ids per step; greedy is argmax over the logits on both
sides. qwenkit's KV pool is sized to the same `--ctx` tokens.

llama.cpp is llama-cpp-python 0.3.36 built from source (not a qwenkit dependency). On an
x86 CPU name its instruction sets instead of GGML_NATIVE, and keep AMX off (GGML_NATIVE
builds crash in decode on some VMs in the AMX tile-config code under GCC 12); for an
AVX2-only CPU:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \\
      -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF \\
      -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF" \\
    CMAKE_BUILD_PARALLEL_LEVEL=2 pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36

(on an AVX-512 CPU: -DGGML_AVX512=ON, plus _VBMI/_VNNI/_BF16 where the CPU has them).
The report prints llama.cpp's own `llama_print_system_info()`: the build that ran.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_core import PROMPTS as GREEDY_PROMPTS  # the chat prompts bench_core's greedy agreement uses
from bench_core import _agreement as agreement

# The batch workload: 164 code tasks of different kinds (HumanEval's count), answered greedily
# to the end of the turn (or --batch-tokens); qwenkit takes them all at once, llama.cpp one at a
# time. More prompts than tasks repeat them, each with its own number.
BATCH_TASKS = (Path(__file__).parent / "data" / "code_tasks.txt").read_text().splitlines()

# Perplexity text: prose and code, written for this benchmark (fixed, so runs compare).
PERPLEXITY_TEXT = '''\
A hash table stores values under keys and finds them again in constant expected time.
It keeps an array of buckets; the hash of a key, reduced modulo the number of buckets,
says which bucket to look in. Two keys can land in the same bucket, so every design has
to say what happens on a collision. Separate chaining keeps a short list in each bucket.
Open addressing keeps every entry in the array itself and, on a collision, probes other
slots in a fixed order: the next slot (linear probing), slots at growing distances
(quadratic probing), or slots chosen by a second hash (double hashing). Linear probing is
the friendliest to the cache, because a probe sequence reads consecutive memory, but it
suffers from clustering: long runs of occupied slots grow longer, since any key that
hashes into a run extends it. When the table fills past a load factor, usually between
one half and three quarters, it is resized to about twice its size and every entry is
inserted again. The cost of that copy is spread over the insertions that caused it, so
an insertion still costs constant amortized time.

Python's dict uses open addressing with a perturbed probe sequence, and since version
3.7 it also remembers the order in which keys were inserted. It does so by splitting the
table in two: a compact array of entries in insertion order, and a sparse array of small
integers that index into it. Iterating over a dict walks the compact array, which is why
iteration is fast and ordered, and why a dict with many deleted keys is compacted when it
is resized.

The function below counts how often each word occurs in a text file and prints the ten
most common words with their counts.

import collections
import re
import sys


def count_words(path: str, top: int = 10) -> list[tuple[str, int]]:
    """The `top` most common words of the file at `path`, with their counts."""
    counts: collections.Counter[str] = collections.Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            counts.update(word.lower() for word in re.findall(r"[A-Za-z']+", line))
    return counts.most_common(top)


def main() -> int:
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} FILE", file=sys.stderr)
        return 2
    for word, count in count_words(sys.argv[1]):
        print(f"{count:>8}  {word}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

A binary search finds a value in a sorted list by halving the range that could hold it.
It compares the value with the middle element; if they are equal the search is over,
if the value is smaller the search goes on in the left half, and otherwise in the right
half. After k comparisons at most n / 2**k candidates are left, so a list of a million
elements needs about twenty comparisons. The classic mistakes are an off-by-one error in
the bounds and, in languages with fixed-size integers, computing the middle as
(low + high) / 2, which overflows when both bounds are large; low + (high - low) / 2
does not.

def binary_search(items: list[int], target: int) -> int:
    """The index of `target` in the sorted list `items`, or -1 when it is absent."""
    low, high = 0, len(items) - 1
    while low <= high:
        middle = (low + high) // 2
        if items[middle] == target:
            return middle
        if items[middle] < target:
            low = middle + 1
        else:
            high = middle - 1
    return -1
'''

KV_F16_BYTES = 2  # llama.cpp's default KV cache type is f16
GGML_LOG_LEVEL_ERROR = 4  # ggml.h's enum ggml_log_level


# -- the parent: workload, alternating runs, report -------------------------------------


def build_workload(model_path: Path, args: argparse.Namespace) -> dict:
    """Token ids for every figure, made once with qwenkit's tokenizer so both engines see the same."""
    from types import SimpleNamespace

    from qwenkit.bench import _prompt
    from qwenkit.kernels.cpu import cpu_flags
    from qwenkit.loader.gguf import GGUFCheckpoint
    from qwenkit.tokenizer import Tokenizer

    ckpt = GGUFCheckpoint(model_path)
    tokenizer = Tokenizer(ckpt.tokenizer_backend(), chat_template=ckpt.chat_template, **ckpt.special_tokens())
    config = ckpt.hf_config()
    holder = SimpleNamespace(tokenizer=tokenizer)  # `_prompt` reads only `.tokenizer`
    # The same prompts qwenkit.bench's _decode gives its streams (32 tokens, salted).
    decode_prompts = {c: [_prompt(holder, 32, 1000 + 100 * c + i) for i in range(c)] for c in (1, args.streams)}
    chat = [[{"role": "user", "content": p}] for p in GREEDY_PROMPTS]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return {
        "model": str(model_path),
        "gguf_bytes": model_path.stat().st_size,
        "kv_elements_per_token": 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim,
        "threads": args.threads,
        "ctx": args.ctx,
        "streams": args.streams,
        "decode_tokens": args.decode_tokens,
        "greedy_tokens": args.greedy_tokens,
        "dtype": args.dtype,
        "quantization": args.quantization,
        "kv_cache_dtype": args.kv_cache_dtype,
        "kv_unified": args.kv_unified,
        "cpu_flags": " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c", "bmi2")))),
        "warmup_ids": _prompt(holder, 16, 0),
        "prefill_ids": _prompt(holder, args.prompt_tokens, 1),
        "decode_prompts": {str(c): p for c, p in decode_prompts.items()},
        "greedy_prompts": [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True) for m in chat],
        "batch_prompts": [tokenizer.apply_chat_template([{"role": "user", "content": task}],
                                                        add_generation_prompt=True, tokenize=True)
                          for task in batch_tasks(args.batch_prompts)],
        "batch_tokens": args.batch_tokens,
        "batch_seqs": args.batch_seqs,
        "perplexity_ids": tokenizer.encode(PERPLEXITY_TEXT),
    }


def batch_tasks(count: int) -> list[str]:
    """The first `count` tasks; past the list's end, the tasks again, numbered."""
    return [BATCH_TASKS[i] if i < len(BATCH_TASKS) else f"{BATCH_TASKS[i % len(BATCH_TASKS)]} (#{i})"
            for i in range(count)]


def run_worker(engine: str, task: str, workload_path: str, threads: int) -> dict:
    """One engine, one task, in a fresh process; its last stdout line is the JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", engine, "--task", task, "--workload", workload_path]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the {engine} {task} run failed (exit code {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="a .gguf file, or 'default' (the embedded model)")
    parser.add_argument("--threads", type=int, help="both engines (default: torch's, the physical cores)")
    parser.add_argument("--repeats", type=int, default=3, help="speed runs per engine, alternating")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="prefill prompt length")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per stream")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams for aggregate decode")
    parser.add_argument("--greedy-tokens", type=int, default=64, help="greedy tokens per agreement prompt")
    parser.add_argument("--ctx", type=int, default=2048, help="KV cache tokens of each engine")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], help="qwenkit's compute dtype")
    parser.add_argument("--quantization", choices=["auto", "gguf", "none", "int8", "int4"], default="auto",
                        help="qwenkit's weight format in memory (as `qwenkit bench --quantization`)")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                        help="qwenkit's KV cache storage (as `qwenkit bench --kv-cache-dtype`)")
    parser.add_argument("--kv-unified", action=argparse.BooleanOptionalAction, default=True,
                        help="llama.cpp: one KV buffer shared by the sequences (default), or --ctx per sequence")
    parser.add_argument("--no-quality", action="store_true", help="skip greedy agreement and perplexity")
    parser.add_argument("--batch-prompts", type=int, default=16,
                        help="batch workload: this many code prompts (0: skip), qwenkit all at once, llama.cpp one "
                             "at a time")
    parser.add_argument("--batch-tokens", type=int, default=128, help="batch workload: most new tokens per prompt")
    parser.add_argument("--batch-seqs", type=int,
                        help="batch workload: qwenkit's max_num_seqs (default: the engine's, 32 on CPU)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--worker", choices=["qwenkit", "llamacpp"], help=argparse.SUPPRESS)
    parser.add_argument("--task", choices=["speed", "quality", "batch"], help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        workload = json.loads(Path(args.workload).read_text())
        worker = {"qwenkit": QwenkitWorker, "llamacpp": LlamaCppWorker}[args.worker](workload)
        print(json.dumps(getattr(worker, args.task)()))
        return

    import torch

    from qwenkit.model_files import resolve_model

    args.threads = args.threads or torch.get_num_threads()
    if min(args.threads, args.repeats, args.streams) < 1 or args.decode_tokens < 2:
        raise SystemExit("--threads, --repeats and --streams must be >= 1, --decode-tokens >= 2")
    files = resolve_model(args.model, progress=False)
    if files.format != "gguf":
        raise SystemExit(f"{args.model} is not a GGUF file: llama.cpp needs one")
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: load average {load_before:.1f} before the runs: other processes share the cores, and "
              "llama.cpp's threads spin at barriers, so its multi-threaded figures collapse while a core is "
              "taken; measure on a quiet machine", file=sys.stderr)
    workload = build_workload(Path(files.path), args)
    needed = max(
        len(workload["prefill_ids"]) + 1,
        args.streams * (32 + args.decode_tokens),
        max(map(len, workload["greedy_prompts"])) + args.greedy_tokens,
        len(workload["perplexity_ids"]),
        max(map(len, workload["batch_prompts"]), default=0) + args.batch_tokens,
    )
    if args.ctx < needed:
        raise SystemExit(f"--ctx {args.ctx} is too small for this workload: it needs {needed} tokens")
    results: dict = {"qwenkit": {"speed": []}, "llamacpp": {"speed": []}}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(workload, f)
    try:
        for i in range(args.repeats):
            for engine in ("qwenkit", "llamacpp"):
                print(f"run {i + 1}/{args.repeats}: {engine} ...", file=sys.stderr, flush=True)
                results[engine]["speed"].append(run_worker(engine, "speed", f.name, args.threads))
        if not args.no_quality:
            for engine in ("qwenkit", "llamacpp"):
                print(f"quality: {engine} ...", file=sys.stderr, flush=True)
                results[engine]["quality"] = run_worker(engine, "quality", f.name, args.threads)
        if args.batch_prompts:
            for engine in ("qwenkit", "llamacpp"):
                print(f"batch workload: {engine} ...", file=sys.stderr, flush=True)
                results[engine]["batch"] = run_worker(engine, "batch", f.name, args.threads)
    finally:
        os.unlink(f.name)
    summary = summarize(workload, results)
    summary["load_average"] = {"before": load_before, "after": os.getloadavg()[0]}
    print(json.dumps(summary, indent=1) if args.json else report(summary))


def summarize(workload: dict, results: dict) -> dict:
    q, l = results["qwenkit"], results["llamacpp"]
    figures = {}
    for key in ("decode_1_tok_s", "prefill_tok_s", "decode_n_tok_s", "peak_rss_mb", "load_s"):
        qs, ls = [r[key] for r in q["speed"]], [r[key] for r in l["speed"]]
        qm, lm = statistics.median(qs), statistics.median(ls)
        figures[key] = {"qwenkit": qm, "llamacpp": lm, "ratio": qm / lm, "qwenkit_runs": qs, "llamacpp_runs": ls}
    n, one = figures["decode_n_tok_s"], figures["decode_1_tok_s"]
    figures["scaling"] = {engine: n[engine] / one[engine] for engine in ("qwenkit", "llamacpp")}
    summary = {
        "model": workload["model"],
        "gguf_mb": workload["gguf_bytes"] / 2**20,
        "threads": workload["threads"],
        "repeats": len(q["speed"]),
        "prompt_tokens": len(workload["prefill_ids"]),
        "decode_tokens": workload["decode_tokens"],
        "streams": workload["streams"],
        "ctx": workload["ctx"],
        "qwenkit": {k: q["speed"][0][k] for k in ("dtype", "kv_cache_dtype", "quantization", "torch", "kv_cache_bytes",
                                                    "kernels", "fused_decode")},
        "cpu_flags": workload["cpu_flags"],
        "llamacpp": {k: l["speed"][0][k] for k in ("version", "system_info", "kv_unified", "n_batch",
                                                     "kv_cache_bytes")},
        "figures": figures,
    }
    if "batch" in q:
        summary["batch"] = {
            "prompts": len(workload["batch_prompts"]), "max_tokens": workload["batch_tokens"],
            "qwenkit": q["batch"], "llamacpp": l["batch"],
            "speedup": l["batch"]["seconds"] / q["batch"]["seconds"],
        }
    if "quality" in q:
        summary["greedy"] = {
            "tokens": workload["greedy_tokens"],
            "agreement": [agreement(a, b) for a, b in zip(q["quality"]["greedy"], l["quality"]["greedy"])],
        }
        summary["perplexity"] = {
            "tokens": len(workload["perplexity_ids"]),
            "qwenkit": q["quality"]["perplexity"],
            "llamacpp": l["quality"]["perplexity"],
        }
    return summary


def target_lines(s: dict) -> list[str]:
    """Each figure against the CPU-speed issue's (#16) target for this machine kind."""
    f, wide = s["figures"], any(flag.startswith(("avx512", "amx")) for flag in s["cpu_flags"].split())
    kind = "AVX-512/AMX" if wide else "AVX2"
    checks = [
        ("decode, 1 stream", f["decode_1_tok_s"]["ratio"], 1.4 if wide else 1.0, ">="),
        (f"decode, {s['streams']} streams", f["decode_n_tok_s"]["ratio"], 1.5, ">="),
        ("prefill", f["prefill_tok_s"]["ratio"], 2.0 if wide else 1.0, ">="),
        ("peak RSS", f["peak_rss_mb"]["ratio"], 1.25, "<="),
    ]
    if "perplexity" in s:
        p = s["perplexity"]
        checks.append(("perplexity", p["qwenkit"] / p["llamacpp"], 1.01, "<="))
    if "batch" in s:
        b = s["batch"]
        full = b["prompts"] >= 164 and b["max_tokens"] >= 512
        checks.append((f"batch workload{'' if full else ' (smaller than the target workload: 164 x 512)'}",
                       b["speedup"], 2.5, ">="))
    lines = [f"issue #16's targets for an {kind} machine (qwenkit / llama.cpp):"]
    for name, value, bound, sense in checks:
        met = value >= bound if sense == ">=" else value <= bound
        lines.append(f"  {name}: {value:.3f}x (target {sense} {bound}x): {'met' if met else 'NOT met'}")
    return lines


def report(s: dict) -> str:
    f = s["figures"]
    qk, lc = s["qwenkit"], s["llamacpp"]
    lines = [
        f"model {s['model']} ({s['gguf_mb']:.0f} MiB GGUF), {s['threads']} threads, "
        f"medians of {s['repeats']} alternating runs each",
        f"CPU flags: {s['cpu_flags']}",
        f"qwenkit: torch {qk['torch']}, dtype {qk['dtype']}, KV cache {qk['kv_cache_dtype']}, quantization "
        f"{qk['quantization']}, fused decode step {'on' if qk['fused_decode'] else 'off'}",
        "qwenkit kernels: " + "; ".join(f"{name} {variant}" for name, variant in qk["kernels"].items()),
        f"llama.cpp: llama-cpp-python {lc['version']}, n_batch {lc['n_batch']}, "
        f"kv_unified {lc['kv_unified']}; {lc['system_info']}",
        "",
        f"{'figure':<44}{'qwenkit':>10}{'llama.cpp':>11}{'qwenkit/llama.cpp':>19}",
    ]

    def row(name: str, key: str, fmt: str = ".1f") -> None:
        v = f[key]
        lines.append(f"{name:<44}{v['qwenkit']:>10{fmt}}{v['llamacpp']:>11{fmt}}{v['ratio']:>19.2f}")

    row("decode, 1 stream (tok/s)", "decode_1_tok_s")
    row(f"prefill, {s['prompt_tokens']}-token prompt (tok/s)", "prefill_tok_s")
    row(f"decode, {s['streams']} streams aggregate (tok/s)", "decode_n_tok_s")
    sc = f["scaling"]
    name = f"{s['streams']} streams / 1 stream"
    lines.append(f"{name:<44}{sc['qwenkit']:>9.2f}x{sc['llamacpp']:>10.2f}x")
    row("peak RSS (MiB)", "peak_rss_mb", ".0f")
    name = f"KV cache (MiB, {s['ctx']} tokens)"
    lines.append(f"{name:<44}{qk['kv_cache_bytes'] / 2**20:>10.0f}{lc['kv_cache_bytes'] / 2**20:>11.0f}")
    row("load (s)", "load_s")
    if "perplexity" in s:
        p = s["perplexity"]
        name = f"perplexity ({p['tokens']}-token text)"
        lines.append(f"{name:<44}{p['qwenkit']:>10.3f}{p['llamacpp']:>11.3f}{p['qwenkit'] / p['llamacpp']:>19.3f}")
    if "batch" in s:
        b = s["batch"]
        name = f"batch: {b['prompts']} prompts, <= {b['max_tokens']} tokens (s)"
        lines.append(f"{name:<44}{b['qwenkit']['seconds']:>10.1f}{b['llamacpp']['seconds']:>11.1f}"
                     f"{b['qwenkit']['seconds'] / b['llamacpp']['seconds']:>19.2f}")
        lines.append(f"  qwenkit all submitted at once, {b['qwenkit']['max_num_seqs']} running at a time: "
                     f"{b['qwenkit']['tokens']} tokens; llama.cpp one at a time "
                     f"{b['llamacpp']['tokens']}: qwenkit {b['speedup']:.2f}x faster")
    lines.append("")
    load = s["load_average"]
    lines.append(f"load average (1 min) {load['before']:.2f} before, {load['after']:.2f} after"
                 + ("  -- NOISY: other processes shared the cores" if max(load.values()) > 0.5 else ""))
    lines.extend(target_lines(s))
    if "greedy" in s:
        g = s["greedy"]
        lines.append(f"greedy agreement (tokens until the first divergence, of {g['tokens']}): "
                     + ", ".join(map(str, g["agreement"])))
    for key, name in (("decode_1_tok_s", "decode 1"), ("prefill_tok_s", "prefill"),
                      ("decode_n_tok_s", f"decode {s['streams']}"), ("peak_rss_mb", "RSS")):
        v = f[key]
        lines.append(f"runs, {name}: qwenkit {', '.join(f'{x:.1f}' for x in v['qwenkit_runs'])}; "
                     f"llama.cpp {', '.join(f'{x:.1f}' for x in v['llamacpp_runs'])}")
    return "\n".join(lines)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- qwenkit, in its own process --------------------------------------------------------


class QwenkitWorker:
    def __init__(self, workload: dict):
        import torch

        torch.set_num_threads(workload["threads"])
        self.w = workload

    def _load(self, kv_tokens: int, max_num_seqs: int | None):
        """qwenkit's LLM with a pool of `kv_tokens` (max_num_seqs None: the engine's default);
        also its load seconds and the pool's bytes."""
        import torch

        from qwenkit.engine.model_runner import resolve_kv_cache_dtype
        from qwenkit.llm import LLM, resolve_dtype

        w = self.w
        dtype = resolve_dtype(w["dtype"], torch.device("cpu"))
        kv_dtype = resolve_kv_cache_dtype(w["kv_cache_dtype"], dtype, torch.device("cpu"))
        kv_bytes = kv_tokens * w["kv_elements_per_token"] * kv_dtype.itemsize
        start = time.perf_counter()
        llm = LLM(w["model"], dtype=dtype, device="cpu", quantization=w["quantization"], progress=False,
                  kv_cache_memory=kv_bytes, kv_cache_dtype=w["kv_cache_dtype"], max_model_len=w["ctx"],
                  max_num_seqs=max_num_seqs, speculative="off")  # llama.cpp decodes plainly too
        return llm, time.perf_counter() - start, kv_bytes

    def speed(self) -> dict:
        import torch

        from qwenkit import kernels
        from qwenkit.bench import _decode, _time_first_token
        from qwenkit.sampling import SamplingParams

        w = self.w
        llm, load_s, kv_bytes = self._load(w["ctx"], max(8, w["streams"]))
        llm.generate(w["warmup_ids"], SamplingParams(max_tokens=2))  # as run_bench warms up
        prefill_s = _time_first_token(llm, w["prefill_ids"])
        decode_1 = _decode(llm, 1, w["decode_tokens"], salt=1)
        decode_n = _decode(llm, w["streams"], w["decode_tokens"], salt=2)
        return {
            "load_s": load_s,
            "prefill_tok_s": len(w["prefill_ids"]) / prefill_s,
            "decode_1_tok_s": decode_1,
            "decode_n_tok_s": decode_n,
            "peak_rss_mb": _peak_rss_mb(),
            "kv_cache_bytes": llm.engine.num_kv_tokens * kv_bytes // w["ctx"],
            "dtype": str(llm.dtype).removeprefix("torch."),
            "kv_cache_dtype": str(llm.engine.runner.kv_dtype).removeprefix("torch."),
            "quantization": w["quantization"],
            "torch": torch.__version__,
            "kernels": kernels.describe(),
            "fused_decode": llm.engine.runner.fused is not None,
        }

    def batch(self) -> dict:
        """The batch workload: every prompt at once, greedy to the end of the turn or the limit."""
        from qwenkit.sampling import SamplingParams

        w = self.w
        # The pool holds every prompt with all its new tokens, so nothing waits or is preempted.
        kv_tokens = sum(len(p) + w["batch_tokens"] for p in w["batch_prompts"])
        llm, _, _ = self._load(kv_tokens, w["batch_seqs"])
        llm.generate(w["warmup_ids"], SamplingParams(max_tokens=2))
        params = SamplingParams(temperature=0, max_tokens=w["batch_tokens"], repetition_penalty=1.0)
        start = time.perf_counter()
        outputs = llm.generate(w["batch_prompts"], params)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "tokens": sum(len(o.token_ids) for o in outputs),
                "max_num_seqs": llm.engine.scheduler.max_num_seqs}

    def quality(self) -> dict:
        import torch
        import torch.nn.functional as F

        from qwenkit.models.attention import AttentionMetadata
        from qwenkit.sampling import SamplingParams

        w = self.w
        llm, _, _ = self._load(w["ctx"], max(8, w["streams"]))
        params = SamplingParams(temperature=0, max_tokens=w["greedy_tokens"], ignore_eos=True, repetition_penalty=1.0)
        greedy = [out.token_ids for out in llm.generate(w["greedy_prompts"], params)]
        # Perplexity: the whole text in one forward pass, logits in slices (the full
        # [tokens, vocab] float32 matrix would be ~0.6 GB per 1,000 tokens).
        ids = w["perplexity_ids"]
        model = llm.model
        with torch.inference_mode():
            kv = model.allocate_kv_cache(len(ids))
            hidden = model(torch.tensor(ids), torch.arange(len(ids)), kv,
                           AttentionMetadata.contiguous(start=0, num_tokens=len(ids)))
            targets = torch.tensor(ids[1:])
            nll = 0.0
            for start in range(0, len(ids) - 1, 256):
                logits = model.compute_logits(hidden[start : min(start + 256, len(ids) - 1)])
                nll += F.cross_entropy(logits, targets[start : start + 256], reduction="sum").item()
        return {"greedy": greedy, "perplexity": float(torch.tensor(nll / (len(ids) - 1)).exp())}


# -- llama.cpp, in its own process ------------------------------------------------------


class LlamaCppWorker:
    """llama.cpp through llama-cpp-python's ctypes bindings of its C API."""

    def __init__(self, workload: dict):
        import llama_cpp as L

        self.L = L
        self.w = workload
        self._silence_logs()
        L.llama_backend_init()
        start = time.perf_counter()
        model_params = L.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(workload["model"].encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {workload['model']}")
        ctx_params = L.llama_context_default_params()
        ctx_params.n_ctx = workload["ctx"]
        ctx_params.n_seq_max = workload["streams"]
        ctx_params.n_threads = ctx_params.n_threads_batch = workload["threads"]
        ctx_params.kv_unified = workload["kv_unified"]
        if not workload["kv_unified"]:
            ctx_params.n_ctx = workload["ctx"] * workload["streams"]  # each sequence gets n_ctx / n_seq_max
        self.ctx = L.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.load_s = time.perf_counter() - start
        self.n_ctx = L.llama_n_ctx(self.ctx)
        self.n_batch = L.llama_n_batch(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.llama_batch = L.llama_batch_init(self.n_batch, 0, workload["streams"])
        self.memory = L.llama_get_memory(self.ctx)

    def _silence_logs(self) -> None:
        """Keep llama.cpp's load and context logs off stderr; errors still show."""
        L = self.L

        def log(level: int, text: bytes, user_data) -> None:
            if level == GGML_LOG_LEVEL_ERROR:
                sys.stderr.write(text.decode(errors="replace"))

        self._log_callback = L.llama_log_callback(log)  # kept: ctypes must not free it
        L.llama_log_set(self._log_callback, None)

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence id, wants logits) entries."""
        b = self.llama_batch
        for i, (token, pos, seq, logits) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(tokens)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _logits(self, i: int):
        import numpy as np

        return np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def _prefill(self, ids: list[int], seq: int = 0) -> int:
        """Feed a prompt to sequence `seq` in n_batch chunks; the greedy next token."""
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            self._decode([(t, start + i, seq, start + i == len(ids) - 1) for i, t in enumerate(chunk)])
        return int(self._logits(-1).argmax())

    def _clear(self) -> None:
        self.L.llama_memory_clear(self.memory, True)

    def _generate(self, prompts: list[list[int]], num_tokens: int) -> tuple[list[list[int]], float]:
        """Greedy `num_tokens` per prompt, all sequences in one batch per step; the
        aggregate tok/s of the steps after each sequence's first token (as qwenkit.bench)."""
        self._clear()
        outputs = [[self._prefill(p, seq)] for seq, p in enumerate(prompts)]
        start = time.perf_counter()
        for _ in range(num_tokens - 1):
            self._decode([(out[-1], len(p) + len(out) - 1, seq, True)
                          for seq, (p, out) in enumerate(zip(prompts, outputs))])
            for i, out in enumerate(outputs):
                out.append(int(self._logits(i).argmax()))
        elapsed = time.perf_counter() - start
        return outputs, len(prompts) * (num_tokens - 1) / elapsed

    def speed(self) -> dict:
        w = self.w
        self._clear()
        self._prefill(w["warmup_ids"])
        self._clear()
        start = time.perf_counter()
        self._prefill(w["prefill_ids"])
        prefill_s = time.perf_counter() - start
        _, decode_1 = self._generate(w["decode_prompts"]["1"], w["decode_tokens"])
        _, decode_n = self._generate(w["decode_prompts"][str(w["streams"])], w["decode_tokens"])
        return {
            "load_s": self.load_s,
            "prefill_tok_s": len(w["prefill_ids"]) / prefill_s,
            "decode_1_tok_s": decode_1,
            "decode_n_tok_s": decode_n,
            "peak_rss_mb": _peak_rss_mb(),
            "kv_cache_bytes": self.n_ctx * w["kv_elements_per_token"] * KV_F16_BYTES,
            "version": self.L.__version__,
            "system_info": self.L.llama_print_system_info().decode().strip(),
            "kv_unified": w["kv_unified"],
            "n_batch": self.n_batch,
        }

    def batch(self) -> dict:
        """The batch workload one prompt at a time (llama.cpp's single-stream path), greedy to an
        end-of-generation token or the limit."""
        L, w = self.L, self.w
        vocab = L.llama_model_get_vocab(self.model)
        self._clear()
        self._prefill(w["warmup_ids"])
        start, tokens = time.perf_counter(), 0
        for prompt in w["batch_prompts"]:
            self._clear()
            token = self._prefill(prompt)
            for n in range(w["batch_tokens"]):
                tokens += 1
                if L.llama_vocab_is_eog(vocab, token) or n + 1 == w["batch_tokens"]:
                    break
                self._decode([(token, len(prompt) + n, 0, True)])
                token = int(self._logits(-1).argmax())
        return {"seconds": time.perf_counter() - start, "tokens": tokens}

    def quality(self) -> dict:
        import numpy as np

        w = self.w
        greedy = [self._generate([p], w["greedy_tokens"])[0][0] for p in w["greedy_prompts"]]
        ids = w["perplexity_ids"]
        self._clear()
        nll = 0.0
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            self._decode([(t, start + i, 0, True) for i, t in enumerate(chunk)])
            logits = np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx), shape=(len(chunk), self.n_vocab))
            logits = logits.astype(np.float64)
            for i in range(len(chunk)):
                if start + i + 1 < len(ids):
                    row = logits[i]
                    top = row.max()
                    nll += top + np.log(np.exp(row - top).sum()) - row[ids[start + i + 1]]
        return {"greedy": greedy, "perplexity": float(np.exp(nll / (len(ids) - 1)))}


if __name__ == "__main__":
    main()
