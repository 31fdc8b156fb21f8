"""Decode steps on this checkout's C kernels against another version of their sources, one process,
alternating: what a kernel change is worth on the whole model, free of the drift between runs.

    git archive <rev> qwenkit/kernels/csrc | tar -x -C /tmp/old
    python benchmarks/ab_kernel_sources.py --other /tmp/old/qwenkit/kernels/csrc [--streams 1] [--prefill 0]

Both libraries are built for this CPU's selected variant (each named by a hash of its sources),
and both run on the one model this checkout loaded: the other version must take the same weight
layouts (Q5_0: 8 rows interleaved at load since 2026-11-29; a version from before packs its rows
otherwise and its Q5_0 numbers here would be wrong: time Q5_0 kernels of different layouts with
benchmarks/ab_q5_0.c, each on its own packing).
Each round runs --steps decode steps of --streams sequences (the fused layers and the lm_head,
as the engine's decode step computes them, the sampler left out) on each library in turn, after
a prompt of --context tokens; --prefill N times a prompt of N tokens instead. Prints each
round's median step, the fastest step, and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from qwenkit import LLM
from qwenkit.engine.model_runner import StepInput
from qwenkit.kernels import cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--other", type=Path, required=True, help="a csrc folder of another version")
    parser.add_argument("--other-flags", default="", help="extra compiler flags for the other build (-DNAME=value)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prefill", type=int, default=0, help="time prompts of this many tokens instead")
    args = parser.parse_args(argv)
    if not (args.other / "kernels.h").is_file():
        parser.error(f"--other {args.other}: not a kernels source folder (no kernels.h)")

    llm = LLM(args.model, device="cpu", quantization=args.quantization, speculative="off")
    this = cpu.library()
    if this is None:
        raise SystemExit("the native CPU kernels are off or could not be built")
    try:
        other = cpu.load(this.isa, extra_flags=tuple(args.other_flags.split()), csrc=args.other)  # named by its sources' hash
    except AttributeError as e:  # ctypes: an entry point this checkout calls is missing there
        raise SystemExit(f"{args.other}: {e}; it predates this checkout's kernel entry points or layouts") from None
    runner = llm.engine.runner
    if runner.fused is None and not args.prefill:
        raise SystemExit("the fused decode step does not apply to this model")
    library = cpu.library
    n, bs = args.streams, runner.block_size
    span = -(-(args.context + args.rounds * args.steps + 1) // bs)
    tables = [list(range(i * span, (i + 1) * span)) for i in range(n)]
    runner.execute(StepInput([list(range(1000, 1000 + args.context))] * n, [0] * n, tables, [True] * n))
    medians: dict[str, list[float]] = {"this": [], "other": []}
    fastest = {"this": float("inf"), "other": float("inf")}
    try:
        for rnd in range(args.rounds):
            for name, lib in (("this", this), ("other", other)):
                cpu.library = lambda lib=lib: lib  # the module path and the lm_head look it up per call
                if runner.fused is not None:
                    runner.fused._layers._lib = lib
                times = []
                if args.prefill:
                    table = list(range(n * span, n * span + -(-args.prefill // bs)))
                    for i in range(3):
                        start = time.perf_counter()
                        runner.execute(StepInput([list(range(2000 + i, 2000 + i + args.prefill))], [0], [table], [True]))
                        times.append(time.perf_counter() - start)
                else:
                    for i in range(args.steps):
                        position = args.context + rnd * args.steps + i  # both libraries see the same contexts
                        start = time.perf_counter()
                        batch = runner.decode_batch([1234] * n, [position] * n, tables)
                        runner.model.compute_logits(runner.fused(batch.input_ids, batch.positions, batch.metadata()))
                        times.append(time.perf_counter() - start)
                medians[name].append(statistics.median(times) * 1e3)
                fastest[name] = min(fastest[name], min(times) * 1e3)
    finally:
        cpu.library = library
        if runner.fused is not None:
            runner.fused._layers._lib = this
    what = f"prefill of {args.prefill} tokens" if args.prefill else f"decode step, {n} stream(s)"
    print(f"{what}, CPU kernels {this.isa}, ms per step: median of the rounds' medians, fastest step, "
          "each round's median")
    for name, values in medians.items():
        print(f"  {name:5s} {statistics.median(values):8.2f} {fastest[name]:8.2f}   {' '.join(f'{v:.1f}' for v in values)}")
    ratio = statistics.median(medians["other"]) / statistics.median(medians["this"])
    print(f"other / this: {ratio:.3f} (medians), {fastest['other'] / fastest['this']:.3f} (fastest steps)")


if __name__ == "__main__":
    main()
