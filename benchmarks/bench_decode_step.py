"""Where a decode step's time goes, and compiled against eager decode steps.

    python benchmarks/bench_decode_step.py [--model default] [--streams 1,8] [--steps 20]
    python benchmarks/bench_decode_step.py --compile [--streams 1,8]
    python benchmarks/bench_decode_step.py --fused [--streams 1,8]
    python benchmarks/bench_decode_step.py --kv-cache-dtypes float32,float16 [--streams 1,8]

Default: per stream count, the median step (wall ms, tok/s) and a CPU-time split of the
step: timing wrappers around the fused decode layers (one C call for all layers, where it
applies), the int8 and GGUF-block (Q5_0) matmuls (with the fused path: the lm_head only),
attention and the sampler; the rest is the embedding, the last norm, scheduling and
Python. Run it with OMP_NUM_THREADS=1 for a split
that load from other processes barely moves (`time.thread_time` is then all of the
compute); with more threads the wrappers see only the calling thread's share.

--compile: builds the engine with compile=True (prints the warm-up time), then runs decode
steps alternately through the compiled graphs and eagerly, in one process.
--fused: decode steps alternately through the fused C layers and the torch modules.
--kv-cache-dtypes A,B: one engine per KV cache dtype in the same process, decode steps
alternately on each (the same prompts); --dtype picks the compute dtype.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from qwenkit import LLM, SamplingParams, kernels
from qwenkit.models import fused_decode, layers

SPLIT = {"fused layers": (fused_decode.FusedDecode, "__call__"), "int8 matmuls": (kernels, "int8_linear"),
         "gguf-block matmuls": (kernels, "gguf_linear"), "attention": (layers, "attention")}


PROMPT_TOKENS = 32  # --prompt-tokens: the context each stream decodes after


def _prompts(llm: LLM, n: int) -> list[list[int]]:
    text = " def merge_sort(items): the quick brown fox jumps" * (PROMPT_TOKENS // 8 + 1)
    return [llm.tokenizer.encode(f"{i}{text}")[:PROMPT_TOKENS] for i in range(n)]


def _start(llm: LLM, streams: int, steps: int) -> None:
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    for i, prompt in enumerate(_prompts(llm, streams)):
        llm.engine.add_request(f"s{streams}-{i}", prompt, params)
    for _ in range(4):  # prefill and a few decode steps
        llm.engine.step()


def _finish(llm: LLM) -> None:
    for request_id in list(llm.engine.requests):
        llm.engine.abort(request_id)


def split(llm: LLM, streams: int, steps: int) -> dict:
    totals = dict.fromkeys([*SPLIT, "sampler"], 0.0)
    originals = []

    def wrap(owner, name, key):
        fn = getattr(owner, name)
        originals.append((owner, name, fn))

        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[key] += time.thread_time() - start

        setattr(owner, name, timed)

    for key, (owner, name) in SPLIT.items():
        wrap(owner, name, key)
    wrap(llm.engine, "sampler", "sampler")
    try:
        _start(llm, streams, steps)
        totals.update(dict.fromkeys(totals, 0.0))
        cpu, wall = [], []
        for _ in range(steps):
            start, start_cpu = time.perf_counter(), time.thread_time()
            llm.engine.step()
            wall.append(time.perf_counter() - start)
            cpu.append(time.thread_time() - start_cpu)
    finally:
        for owner, name, fn in reversed(originals):
            setattr(owner, name, fn)
        _finish(llm)
    ms = {key: round(t / steps * 1e3, 1) for key, t in totals.items()}
    ms["rest"] = round(sum(cpu) / steps * 1e3 - sum(ms.values()), 1)
    median = statistics.median(wall)
    return {"streams": streams, "wall_ms": round(median * 1e3, 1), "tok_s": round(streams / median, 1),
            "cpu_ms": round(sum(cpu) / steps * 1e3, 1), "cpu_split_ms": ms}


def alternating(llm: LLM, streams: int, steps: int, path: str) -> dict:
    """Decode steps alternately with the runner's `path` ("compiled" or "fused") and without it (eager)."""
    runner = llm.engine.runner
    kept = getattr(runner, path)
    if kept is None:
        raise SystemExit(f"the {path} decode path does not apply to this model")
    _start(llm, streams, 2 * steps)
    times = {"eager": [], path: []}
    try:
        for i in range(2 * steps):
            name = path if i % 2 else "eager"
            setattr(runner, path, kept if i % 2 else None)
            start, start_cpu = time.perf_counter(), time.thread_time()
            llm.engine.step()
            times[name].append((time.perf_counter() - start, time.thread_time() - start_cpu))
    finally:
        setattr(runner, path, kept)
        _finish(llm)
    return _step_times(streams, times)


def _step_times(streams: int, times: dict[str, list[tuple[float, float]]]) -> dict:
    """{name: [(wall s, CPU s) per step]} -> median wall, min wall and median CPU ms per name."""
    return {"streams": streams} | {
        name: {"wall_ms": round(statistics.median(w for w, _ in t) * 1e3, 1),
               "min_ms": round(min(w for w, _ in t) * 1e3, 1),
               "cpu_ms": round(statistics.median(c for _, c in t) * 1e3, 1)}
        for name, t in times.items()
    }


def alternating_engines(llms: dict[str, LLM], streams: int, steps: int) -> dict:
    """Decode steps alternately on each engine of `llms` (same prompts on each)."""
    for llm in llms.values():
        _start(llm, streams, steps)
    times = {name: [] for name in llms}
    try:
        for _ in range(steps):
            for name, llm in llms.items():
                start, start_cpu = time.perf_counter(), time.thread_time()
                llm.engine.step()
                times[name].append((time.perf_counter() - start, time.thread_time() - start_cpu))
    finally:
        for llm in llms.values():
            _finish(llm)
    return _step_times(streams, times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="as `qwenkit run --model` (default: the embedded model)")
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--fused", action="store_true")
    parser.add_argument("--kv-cache-dtypes", help="e.g. float32,float16: one engine each, steps alternating")
    parser.add_argument("--dtype", help="compute dtype (default: qwenkit's choice for this CPU)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="context before the timed steps")
    args = parser.parse_args()
    global PROMPT_TOKENS
    PROMPT_TOKENS = args.prompt_tokens
    if args.kv_cache_dtypes:
        llms = {kv: LLM(args.model, dtype=args.dtype, quantization=args.quantization, kv_cache_dtype=kv,
                        progress=False, speculative="off") for kv in args.kv_cache_dtypes.split(",")}
        for streams in (int(s) for s in args.streams.split(",")):
            print(json.dumps(alternating_engines(llms, streams, args.steps)), flush=True)
        return
    start = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, compile=args.compile, progress=False,
              speculative="off")
    print(json.dumps({"load_s": round(time.perf_counter() - start, 1)}), flush=True)
    for streams in (int(s) for s in args.streams.split(",")):
        if args.compile or args.fused:
            result = alternating(llm, streams, args.steps, "compiled" if args.compile else "fused")
        else:
            result = split(llm, streams, args.steps)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
