"""Decode speed beside other busy programs: qwenkit's default threads, qwenkit with one thread,
and llama.cpp (2 threads), side by side, with 0, 1, 2 and 4 busy processes on the machine.

    python benchmarks/bench_contention.py [--model default] [--loads 0,1,2,4] [--streams 1,8]
        [--tokens 64] [--repeats 3] [--json]
    python benchmarks/bench_contention.py --quick      # a smoke test: 8 tokens, 2 busy processes

The busy processes are pure-Python spin loops (`while True: pass`), started before each load
level and stopped after it, as a browser tab, a build or another model would hold a core.
Each engine lives in its own process, loaded once and warmed up at every stream count, and
waits on a pipe between runs; at each load level the engines take turns (the order rotating
from one repeat to the next), each decoding `--tokens` greedy tokens per stream at every
`--streams` count: aggregate decode tok/s, timed once every stream has its first token (as
`qwenkit bench`). The busy processes share the machine with the benchmark as they would with
a user's: on a machine where other work runs too, every figure drops with it.

The engine processes get the environment this script started with: qwenkit sets its own
OpenMP wait policy when imported (docs/decode.md#threads), llama.cpp runs as it comes.

Targets, for k busy processes on c cores (the report prints each as met or not): qwenkit's
default keeps >= 0.8 x c / (c + k) of its own idle speed, is never slower than its own
threads=1 under the same load, and >= 1.0x llama.cpp's. llama.cpp is llama-cpp-python
(the `bench` extra, built from source with the CMAKE_ARGS of docs/benchmarks.md); without
it the llama.cpp column is left out, with a note.

--engine NAME=SPEC (repeatable) replaces the engines: SPEC is `qwenkit`, `qwenkit:threads=N`,
`llamacpp:threads=N`, with `,ENV=VALUE` items appended to set an environment variable in that
engine's process (A/B experiments: `--engine spin=qwenkit,GOMP_SPINCOUNT=300000`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BASE_ENV = dict(os.environ)  # before qwenkit is imported here (it sets OpenMP defaults)
PROMPT_TOKENS = 32
DEFAULT_ENGINES = {"qwenkit": "qwenkit", "qwenkit threads=1": "qwenkit:threads=1", "llama.cpp": "llamacpp:threads=2"}


@dataclass(frozen=True)
class EngineSpec:
    name: str
    kind: str  # "qwenkit" or "llamacpp"
    threads: int | None = None  # None: the engine's default
    env: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, name: str, spec: str) -> "EngineSpec":
        kind, *items = spec.replace(":", ",").split(",")
        if kind not in ("qwenkit", "llamacpp"):
            raise SystemExit(f"error: engine {name!r}: {kind!r} is not qwenkit or llamacpp")
        threads, env = None, {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"error: engine {name!r}: {item!r} is not KEY=VALUE")
            if key == "threads":
                threads = int(value)
            else:
                env[key] = value
        if kind == "llamacpp" and threads is None:
            threads = 2
        return cls(name, kind, threads, env)


# -- the engines, each in its own process ----------------------------------------------


class QwenkitEngine:
    def __init__(self, model: str, threads: int | None, max_streams: int):
        from qwenkit import LLM
        from qwenkit.sampling import SamplingParams

        self.llm = LLM(model, device="cpu", threads=threads, progress=False, max_num_seqs=max(8, max_streams),
                       speculative="off")
        self.llm.generate(self.llm.tokenizer.encode("warm up")[:4], SamplingParams(max_tokens=2))
        import torch

        self.threads = torch.get_num_threads()

    def decode(self, prompts: list[list[int]], tokens: int) -> float:
        from qwenkit.sampling import SamplingParams

        engine = self.llm.engine
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"contention-{time.monotonic_ns()}-{i}", prompt, params)
        started: set = set()
        while len(started) < len(prompts):  # prefill until every stream has its first token
            started.update((u.request_id, u.index) for u in engine.step())
        start, generated = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            generated += sum(len(u.outputs) for u in engine.step())
        return generated / (time.perf_counter() - start)


class LlamaCppEngine:
    def __init__(self, model: str, threads: int, max_streams: int, ctx: int):
        sys.path.insert(0, str(Path(__file__).parent))
        from compare_llamacpp import LlamaCppWorker

        self.worker = LlamaCppWorker({"model": model, "ctx": ctx, "streams": max_streams, "threads": threads,
                                      "kv_unified": True})
        self.threads = threads
        self.worker._clear()
        self.worker._prefill([1, 2, 3, 4])

    def decode(self, prompts: list[list[int]], tokens: int) -> float:
        return self.worker._generate(prompts, tokens)[1]


def worker_main(spec: dict) -> None:
    """An engine process: loads, says ready, then answers one JSON line per decode request."""
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed goes to stderr
    if spec["kind"] == "qwenkit":
        engine = QwenkitEngine(spec["model"], spec["threads"], spec["max_streams"])
    else:
        engine = LlamaCppEngine(spec["model"], spec["threads"], spec["max_streams"], spec["ctx"])
    protocol.write(json.dumps({"threads": engine.threads}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        request = json.loads(line)
        tok_s = engine.decode(request["prompts"], request["tokens"])
        protocol.write(json.dumps({"tok_s": tok_s}) + "\n")
        protocol.flush()


class EngineProcess:
    def __init__(self, spec: EngineSpec, model: str, max_streams: int, ctx: int):
        self.spec = spec
        payload = {"kind": spec.kind, "threads": spec.threads, "model": model, "max_streams": max_streams, "ctx": ctx}
        env = {**BASE_ENV, **spec.env}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(payload)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.threads = self._reply()["threads"]

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"error: the {self.spec.name} process exited (code {self.proc.wait()})")
        return json.loads(line)

    def decode(self, prompts: list[list[int]], tokens: int) -> float:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        return self._reply()["tok_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# -- the busy processes ----------------------------------------------------------------


def start_busy(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], env=BASE_ENV) for _ in range(count)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()


# -- the run and its report ------------------------------------------------------------


def run(specs: list[EngineSpec], model: str, prompts: dict[int, list[list[int]]], loads: list[int], tokens: int,
        repeats: int) -> dict:
    max_streams = max(prompts)
    ctx = max(1024, max_streams * (PROMPT_TOKENS + tokens + 8))
    engines = []
    try:
        for spec in specs:
            print(f"loading {spec.name} ...", file=sys.stderr, flush=True)
            engines.append(EngineProcess(spec, model, max_streams, ctx))
            for ps in prompts.values():  # each batch size once before timing (first-use allocations)
                engines[-1].decode(ps, 4)
        results = {e.spec.name: {"threads": e.threads, "tok_s": {}} for e in engines}
        for k in loads:
            busy = start_busy(k)
            try:
                time.sleep(0.5 if k else 0)
                for r in range(repeats):
                    turn = engines[r % len(engines):] + engines[: r % len(engines)]
                    for e in turn:
                        for streams, ps in prompts.items():
                            tok_s = e.decode(ps, tokens)
                            results[e.spec.name]["tok_s"].setdefault(f"{k},{streams}", []).append(tok_s)
                            print(f"busy {k}  {e.spec.name:>20}  {streams} streams  {tok_s:7.2f} tok/s",
                                  file=sys.stderr, flush=True)
            finally:
                stop_busy(busy)
    finally:
        for e in engines:
            e.close()
    return results


def summarize(results: dict, cores: int, loads: list[int], streams: list[int]) -> dict:
    """Medians per (load, streams), and each target's ratio where both sides ran."""
    median = {name: {key: statistics.median(v) for key, v in r["tok_s"].items()} for name, r in results.items()}
    rows = []
    for k in loads:
        for s in streams:
            row = {"busy": k, "streams": s, **{name: m[f"{k},{s}"] for name, m in median.items()}}
            q = median.get("qwenkit", {})
            if q:
                if f"0,{s}" in q:
                    row["kept"] = q[f"{k},{s}"] / q[f"0,{s}"]
                    row["kept_target"] = 0.8 * cores / (cores + k)
                for other, key in (("qwenkit threads=1", "vs_threads_1"), ("llama.cpp", "vs_llamacpp")):
                    if other in median:
                        row[key] = q[f"{k},{s}"] / median[other][f"{k},{s}"]
            rows.append(row)
    return {"cores": cores, "threads": {name: r["threads"] for name, r in results.items()}, "rows": rows,
            "runs": {name: r["tok_s"] for name, r in results.items()}}


def report(s: dict) -> str:
    names = list(s["threads"])
    lines = [f"cores {s['cores']}; threads: " + ", ".join(f"{n} {t}" for n, t in s["threads"].items()),
             "decode tok/s (aggregate), medians:",
             f"{'busy':>4} {'streams':>7} " + " ".join(f"{n:>18}" for n in names)
             + "   kept (target)   vs threads=1   vs llama.cpp"]
    for row in s["rows"]:
        line = f"{row['busy']:>4} {row['streams']:>7} " + " ".join(f"{row[n]:>18.2f}" for n in names)
        if "kept" in row:
            mark = "ok" if row["kept"] >= row["kept_target"] else "MISSED"
            line += f"   {row['kept']:.2f} ({row['kept_target']:.2f}) {mark:<6}"
        else:  # no idle run to compare with
            line += " " * 21
        for key in ("vs_threads_1", "vs_llamacpp"):
            if key in row:
                line += f"   {row[key]:.2f}x {'ok' if row[key] >= 1 else 'MISSED':<6}"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="a .gguf file, or 'default' (the embedded model)")
    parser.add_argument("--loads", default="0,1,2,4", help="numbers of busy processes, comma-separated")
    parser.add_argument("--streams", default="1,8", help="concurrent streams, comma-separated")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per stream and run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per engine and figure, alternating engines")
    parser.add_argument("--engine", action="append", metavar="NAME=SPEC", help="replace the engines (see above)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 8 tokens, 1 stream, 2 busy processes, once")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(json.loads(args.worker))
    if args.quick:
        args.loads, args.streams, args.tokens, args.repeats = "2", "1", 8, 1
    try:
        loads = [int(x) for x in args.loads.split(",")]
        streams = [int(x) for x in args.streams.split(",")]
    except ValueError:
        raise SystemExit("error: --loads and --streams take comma-separated whole numbers")
    if min(loads) < 0 or min(streams) < 1 or args.tokens < 2 or args.repeats < 1:
        raise SystemExit("error: --loads >= 0, --streams >= 1, --tokens >= 2 and --repeats >= 1")

    from qwenkit.engine.threads import physical_cores
    from qwenkit.loader.gguf import GGUFCheckpoint
    from qwenkit.model_files import resolve_model
    from qwenkit.tokenizer import Tokenizer

    specs = [EngineSpec.parse(*e.split("=", 1)) for e in args.engine or []] or [
        EngineSpec.parse(name, spec) for name, spec in DEFAULT_ENGINES.items()]
    files = resolve_model(args.model, progress=False)
    if files.format != "gguf" and any(s.kind == "llamacpp" for s in specs):
        raise SystemExit(f"error: {args.model} is not a GGUF file: llama.cpp needs one")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        if any(s.kind == "llamacpp" for s in specs):
            print("note: llama-cpp-python is not installed (the `bench` extra, built as docs/benchmarks.md says): "
                  "llama.cpp is left out", file=sys.stderr)
            specs = [s for s in specs if s.kind != "llamacpp"]
    ckpt = GGUFCheckpoint(Path(files.path))
    tokenizer = Tokenizer(ckpt.tokenizer_backend(), chat_template=ckpt.chat_template, **ckpt.special_tokens())
    text = " def merge_sort(items): the quick brown fox jumps over the lazy dog" * (PROMPT_TOKENS // 8 + 1)
    prompts = {s: [tokenizer.encode(f"{s}-{i}{text}")[:PROMPT_TOKENS] for i in range(s)] for s in streams}
    load_before = os.getloadavg()[0]
    results = run(specs, str(files.path), prompts, loads, args.tokens, args.repeats)
    summary = summarize(results, physical_cores(), loads, streams)
    summary.update(tokens=args.tokens, repeats=args.repeats, load_average_before=load_before,
                   cpu=_cpu_name(), model=str(files.path))
    print(json.dumps(summary, indent=1) if args.json else report(summary))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


if __name__ == "__main__":
    main()
