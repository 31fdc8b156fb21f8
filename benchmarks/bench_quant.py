"""Weights kept quantized (qwenkit/models/quant.py) against float32, on the default GGUF.

    python benchmarks/bench_quant.py [--model default] [--variant auto --variant int4 ...] [--no-bf16]
    python benchmarks/bench_quant.py --export-safetensors DIR   # a bf16 safetensors copy of the GGUF
    python benchmarks/bench_quant.py --model DIR --variant int8 --variant int4   # safetensors figures

Reports, in this order:
1. load time and peak RSS per quantization, each in a fresh process: the RSS before the
   weights (interpreter, torch, tokenizer) and the increment the weights add, against the
   file's size (no KV cache is allocated here);
2. the relative RMS error of requantizing one matrix of each GGUF type to int8 and int4;
3. milliseconds per matmul for each format at several batch sizes M, the model's shapes;
4. per variant, side by side with float32 in one process: decode tok/s, greedy agreement
   with float32 (tokens until the first divergence, 5 chat prompts, 64 tokens each), and
   perplexity on a fixed ~1000-token English + code text (float32, bfloat16, each variant;
   auto+torch also through the bfloat16-activation kernels decode takes without the native ones).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

PROMPTS = [
    "Write a Python function that reverses a string.",
    "Explain the difference between a list and a tuple in Python.",
    "What does the SQL statement SELECT COUNT(*) FROM users; return?",
    "Write a bash one-liner that counts the lines of every .py file in a folder.",
    "Implement binary search in JavaScript and explain its complexity.",
]

# A fixed passage for perplexity: English prose, then code (about 1000 Qwen tokens).
TEXT = '''The history of computing is often told as a story of machines, but it is just as much a story of
ideas about how to describe work precisely enough that a machine could do it. Long before the
first electronic computers, clerks in insurance offices and observatories followed written
procedures to produce tables of numbers, and the people who performed these calculations were
themselves called computers. When mechanical calculators became common, the procedures did not
disappear; they were simply divided differently between the person and the device.

The important shift came when the procedure itself could be stored inside the machine. A stored
program meant that the same hardware could be a payroll system in the morning and a simulation of
a bridge in the afternoon. It also meant that mistakes in the procedure became mistakes in the
program, and so programming quickly developed its own habits: careful naming, small functions
with one purpose, tests that check each piece on its own, and documentation that explains why a
choice was made rather than repeating what the code already says.

Modern software keeps these habits even as the tools change. A developer who writes a parser, a
scheduler or a numerical routine still has to decide what the inputs are, what can go wrong, and
how to report an error so that the person reading it knows what to do next. Good error messages
name the thing that was wrong and suggest a fix. Good interfaces make the common case short and
the rare case possible. And good programs are read far more often than they are written, which is
why clarity usually matters more than cleverness.

Here is a small example in Python: a function that groups words by their first letter, sorts each
group, and returns the result as a dictionary.

def group_by_initial(words):
    """Map each first letter to the sorted list of words that start with it."""
    groups = {}
    for word in words:
        if not word:
            continue
        key = word[0].lower()
        groups.setdefault(key, []).append(word)
    return {key: sorted(values) for key, values in sorted(groups.items())}


class RunningMean:
    """Mean and variance of a stream of numbers, updated one value at a time (Welford)."""

    def __init__(self):
        self.count = 0
        self.mean = 0.0
        self._m2 = 0.0

    def add(self, value):
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self._m2 += delta * (value - self.mean)

    @property
    def variance(self):
        return self._m2 / (self.count - 1) if self.count > 1 else 0.0


def fibonacci(n):
    """Return the n-th Fibonacci number, computed iteratively."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


if __name__ == "__main__":
    stats = RunningMean()
    for i in range(10):
        stats.add(fibonacci(i))
    print(group_by_initial(["banana", "Apple", "cherry", "avocado", "blueberry"]))
    print(f"mean={stats.mean:.2f} variance={stats.variance:.2f}")

The same ideas appear in other languages. In SQL, a query such as SELECT name, COUNT(*) FROM
orders GROUP BY name HAVING COUNT(*) > 3 ORDER BY name; describes what result is wanted and leaves
the database to decide how to compute it. In a shell, a pipeline like
find . -name "*.py" | xargs wc -l | sort -n | tail -5 combines small tools, each doing one job,
into a larger one. Whatever the language, the lesson is the same: describe the work clearly, check
it with small examples, and keep each part simple enough that the next person can change it safely.

A last example shows how a small command-line tool reads its options and reports errors:

import argparse
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Count the words of text files.")
    parser.add_argument("paths", nargs="+", help="the files to read")
    parser.add_argument("--top", type=int, default=10, help="how many words to show")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    counts = {}
    for path in args.paths:
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    for word in line.split():
                        counts[word] = counts.get(word, 0) + 1
        except OSError as error:
            print(f"cannot read {path}: {error.strerror}", file=sys.stderr)
            return 1
    for word, count in sorted(counts.items(), key=lambda item: -item[1])[: args.top]:
        print(f"{count:6d} {word}")
    return 0
'''

SHAPES = {  # the default model's matrices, (N, K)
    "qkv_proj": (1152, 896), "o_proj": (896, 896), "gate_up_proj": (9728, 896),
    "down_proj": (896, 4864), "lm_head": (151936, 896),
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_load(model: str, quantization: str) -> dict:
    """Load time and memory of one quantization (run in a fresh process)."""
    import gc

    import torch

    from qwenkit.loader import load_model
    from qwenkit.model_files import resolve_model

    files = resolve_model(model, progress=False)
    if files.format == "gguf":  # what load_model builds before the weights, built once to measure it
        from qwenkit.loader.gguf import GGUFCheckpoint
        from qwenkit.tokenizer import Tokenizer

        ckpt = GGUFCheckpoint(files.path)
        Tokenizer(ckpt.tokenizer_backend(), chat_template=ckpt.chat_template, **ckpt.special_tokens())
        del ckpt
        gc.collect()
    baseline = _rss_mb()
    t0 = time.perf_counter()
    loaded = load_model(files, dtype=torch.float32, device=torch.device("cpu"), quantization=quantization,
                        progress=False)
    load_s = time.perf_counter() - t0
    tensors = list(loaded.model.parameters()) + list(loaded.model.buffers())
    size = sum(p.stat().st_size for p in ([files.path] if files.path.is_file() else files.path.glob("*.safetensors")))
    return {
        "quantization": quantization,
        "load_s": round(load_s, 1),
        "file_mb": round(size / 2**20),
        "weights_mb": round(sum(t.numel() * t.element_size() for t in tensors) / 2**20),
        "baseline_rss_mb": round(baseline),
        "peak_rss_mb": round(_peak_mb()),
        "increment_mb": round(_peak_mb() - baseline),
    }


def requantization_errors(model: str) -> list[dict]:
    """Relative RMS error of int8 and int4 against the stored values, one matrix per GGUF type."""
    import torch

    from qwenkit.loader.gguf import GGUFCheckpoint
    from qwenkit.model_files import resolve_model
    from qwenkit.models import quant

    ckpt = GGUFCheckpoint(resolve_model(model, progress=False).path)
    chosen = {}
    for name, tensor in ckpt.iter_weights(lazy=True):
        if len(tensor.shape) == 2 and name.startswith("model.layers.") and tensor.ggml_type.name not in ("F32", "F16"):
            chosen.setdefault(tensor.ggml_type.name, (name, tensor))
    rows = []
    for type_name, (name, tensor) in sorted(chosen.items()):
        w = tensor.read_rows(0, tensor.shape[0])
        q, scale = quant.quantize_int8(w)
        rms = w.pow(2).mean().sqrt()
        int8 = ((q.float() * scale[:, None] - w).pow(2).mean().sqrt() / rms).item()
        if tensor.stores_int4:
            q4, s4, low = tensor.read_int4(0, tensor.shape[0])
            w4 = quant.dequantize_int4(q4, s4.to(torch.bfloat16).float(), (low + 8 * s4).to(torch.bfloat16).float())
        else:
            w4 = quant.dequantize_int4(*quant.quantize_int4(w))
        int4 = ((w4 - w).pow(2).mean().sqrt() / rms).item()
        rows.append({"type": type_name, "tensor": name, "int8_rel_rms": round(int8, 5), "int4_rel_rms": round(int4, 5)})
    return rows


def matmul_timings(ms: list[int], rounds: int) -> list[dict]:
    """Best of `rounds` interleaved rounds, ms per call, for each format and shape."""
    import torch
    import torch.nn.functional as F

    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    from qwenkit import kernels
    from qwenkit.kernels import cpu
    from qwenkit.models import quant

    def clock(fn) -> float:
        fn()
        n, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < 0.2 or n < 2:
            fn()
            n += 1
        return elapsed / n * 1e3

    results = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.02
        q8, s8 = quant.quantize_int8(w)
        s8 = s8.to(torch.bfloat16)
        layer4 = quant.QuantLinear(k, [n], bias=False, dtype=torch.float32, format=quant.INT4)
        layer4.weight.weight_loader(layer4.weight, w, None)
        q5 = kernels.gguf_pack(torch.from_numpy(gguf_quantize(w.numpy(), GGMLQuantizationType.Q5_0)), k, "Q5_0")
        for m in ms:
            if name == "lm_head" and m > 64:
                continue  # the engine computes logits for sampled rows only
            x = torch.randn(m, k)
            methods = {
                "float32": lambda: F.linear(x, w),
                "int8 kernel": lambda: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q8, s8).float(),
                "int8 native": lambda: cpu.library().int8_linear(x, q8, s8),
                "q5_0 native": lambda: cpu.library().gguf_linear(x, q5, k, "Q5_0"),
                "int8 dequant": lambda: _dequant_linear(x, q8, s8),
                "int4 kernel": lambda: layer4(x),
            }
            best = {key: math.inf for key in methods}
            for _ in range(rounds):
                for key, fn in methods.items():
                    best[key] = min(best[key], clock(fn))
            results.append({"matrix": name, "N": n, "K": k, "M": m, **{k_: round(v, 3) for k_, v in best.items()}})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def _native_kernels(on: bool) -> None:
    """Turn qwenkit's C kernels on or off for what is built from now on (QWENKIT_NATIVE_KERNELS)."""
    from qwenkit.kernels import cpu

    os.environ["QWENKIT_NATIVE_KERNELS"] = "1" if on else "0"
    cpu.library.cache_clear()


def _dequant_linear(x, q8, s8):
    """The int8 path taken above MAX_KERNEL_TOKENS rows, whatever M is."""
    from qwenkit import kernels
    from qwenkit.kernels.ops import linear as linear_ops

    saved = linear_ops.MAX_KERNEL_TOKENS, linear_ops.MAX_NATIVE_KERNEL_TOKENS
    linear_ops.MAX_KERNEL_TOKENS = linear_ops.MAX_NATIVE_KERNEL_TOKENS = -1
    try:
        return kernels.int8_linear(x, q8, s8)
    finally:
        linear_ops.MAX_KERNEL_TOKENS, linear_ops.MAX_NATIVE_KERNEL_TOKENS = saved


def perplexity(llm, ids: list[int], chunk: int = 256) -> float:
    """exp(mean negative log-likelihood) of ids[1:], prefilling `chunk` tokens at a time."""
    import torch

    from qwenkit.models.attention import AttentionMetadata

    model = llm.model
    nll = 0.0
    with torch.inference_mode():
        kv = model.allocate_kv_cache(len(ids))
        for start in range(0, len(ids) - 1, chunk):
            piece = ids[start : start + chunk]
            meta = AttentionMetadata.contiguous(start=start, num_tokens=len(piece))
            hidden = model(torch.tensor(piece), torch.arange(start, start + len(piece)), kv, meta)
            targets = torch.tensor(ids[start + 1 : start + 1 + len(piece)])
            logits = model.compute_logits(hidden[: len(targets)])
            nll -= logits.log_softmax(-1).gather(1, targets[:, None]).sum().item()
    return math.exp(nll / (len(ids) - 1))


def greedy(llm, max_tokens: int = 64) -> list[list[int]]:
    from qwenkit import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs = []
    for prompt in PROMPTS:
        text = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        outputs.append(llm.generate(text, params)[0].token_ids)
    return outputs


def decode_step_times(llm, decode_tokens: int = 32) -> list[float]:
    """Seconds between consecutive tokens of one greedy request (after its prefill)."""
    from qwenkit import SamplingParams

    ids = llm.tokenizer.encode(TEXT)[:32]
    stream = llm.stream(ids, SamplingParams(temperature=0, max_tokens=decode_tokens + 1, ignore_eos=True))
    next(stream)  # the first token comes from the prefill
    times, last = [], time.perf_counter()
    for _ in stream:
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


def agreement(a: list[int], b: list[int]) -> int:
    """Tokens until the first divergence."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(model: str, variants: list[str], *, bf16: bool, rounds: int, accuracy: bool = True) -> dict:
    """Everything that runs side by side in this one process."""
    import torch

    from qwenkit import LLM, kernels
    from qwenkit.kernels.ops import linear as linear_ops
    from qwenkit.models import quant

    def load(dtype: str, quantization: str):
        return LLM(model, dtype=dtype, quantization=quantization, kv_cache_memory=256 << 20, progress=False,
                   speculative="off")

    reference = load("float32", "none")
    ids = reference.tokenizer.encode(TEXT)
    report = {"text_tokens": len(ids), "threads": torch.get_num_threads(), "variants": []}
    if accuracy:
        ref_greedy = greedy(reference)
        report["float32"] = {"perplexity": round(perplexity(reference, ids), 4)}
    if bf16 and accuracy:
        half = load("bfloat16", "none")
        report["bfloat16"] = {"perplexity": round(perplexity(half, ids), 4)}
        try:
            report["bfloat16"]["agreement"] = [agreement(a, b) for a, b in zip(greedy(half), ref_greedy)]
        except RuntimeError as e:  # reported, so that the quantized variants still run
            report["bfloat16"]["agreement_error"] = str(e)
        del half
    for variant in variants:
        quantization, _, option = variant.partition("+")
        saved = dict(_auto_formats())
        if option == "q4k-int4":  # the alternative mapping for Q4_K, to measure it
            _auto_formats()[_q4_k()] = quant.INT4
        try:
            _native_kernels(option != "torch")  # "+torch": as without a C compiler
            llm = load("float32", quantization)
        finally:
            _auto_formats().clear()
            _auto_formats().update(saved)
        formats = {}
        for name, module in llm.model.named_modules():
            if hasattr(module, "format") and ".parts." not in name:  # a format per part: counted once, joined
                key = " + ".join(module.format) if isinstance(module.format, tuple) else module.format
                formats[key] = formats.get(key, 0) + 1
        row = {"variant": variant, "formats": formats}
        if accuracy:
            row["perplexity"] = round(perplexity(llm, ids), 4)  # the paths prefill takes
            if option == "torch":  # and through the bfloat16-activation kernels decode takes
                saved_max, linear_ops.MAX_KERNEL_TOKENS = linear_ops.MAX_KERNEL_TOKENS, 1 << 30
                try:
                    row["perplexity_decode_kernels"] = round(perplexity(llm, ids), 4)
                finally:
                    linear_ops.MAX_KERNEL_TOKENS = saved_max
            row["agreement"] = [agreement(a, b) for a, b in zip(greedy(llm), ref_greedy)]
        steps = {"float32": [], variant: []}
        for _ in range(rounds):  # alternate, so both see the same machine load
            steps["float32"] += decode_step_times(reference)
            steps[variant] += decode_step_times(llm)
        # The median step is what a user saw; the fastest steps (10th percentile) are close
        # to what an idle machine gives, other processes on a shared machine slowing the rest.
        row["decode_tok_s_median"] = {key: round(1 / sorted(v)[len(v) // 2], 2) for key, v in steps.items()}
        row["decode_tok_s_p10"] = {key: round(1 / sorted(v)[len(v) // 10], 2) for key, v in steps.items()}
        report["variants"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del llm
    return report


def _auto_formats() -> dict:
    from qwenkit.loader.quantization import gguf_auto_formats

    return gguf_auto_formats()


def _q4_k():
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType.Q4_K


def export_safetensors(model: str, folder: str) -> None:
    """A Hugging Face folder (bfloat16 safetensors, config, tokenizer) with the GGUF's values."""
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from qwenkit.loader.gguf import GGUFCheckpoint
    from qwenkit.model_files import resolve_model

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = GGUFCheckpoint(resolve_model(model, progress=False).path)
    (out / "config.json").write_text(json.dumps(ckpt.hf_config()))
    (out / "generation_config.json").write_text(json.dumps(ckpt.generation_config()))
    ckpt.tokenizer_backend().save(str(out / "tokenizer.json"))
    special = ckpt.special_tokens()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": ckpt.chat_template, "eos_token": special["eos_token"], "pad_token": special["pad_token"],
        "bos_token": None,
    }))
    tensors = {name: t.to(torch.bfloat16).contiguous() for name, t in ckpt.iter_weights()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--variant", action="append",
                        help="repeatable: auto, int8, int4, auto+q4k-int4 (Q4_K as int4), auto+torch (as "
                             "without a C compiler: torch's kernels); default: auto, auto+torch, int4")
    parser.add_argument("--no-bf16", action="store_true", help="skip the (slow, emulated here) bfloat16 model")
    parser.add_argument("--ms", default="1,4,8,16,32,64,128,512", help="batch sizes for the matmul timings")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, at most the cores)")
    parser.add_argument("--matmul-threads", type=int, default=1,
                        help="threads for the matmul timings: 1 is robust to other processes on the machine")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["load", "errors", "matmul", "compare", "accuracy"])
    parser.add_argument("--export-safetensors", metavar="DIR")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads or min(torch.get_num_threads(), os.cpu_count() or 1))
    if args.worker:
        print(json.dumps(measure_load(args.model, args.worker)))
        return
    if args.export_safetensors:
        export_safetensors(args.model, args.export_safetensors)
        return
    variants = args.variant or ["auto", "auto+torch", "int4"]
    report: dict = {"model": args.model, "threads": torch.get_num_threads()}
    if "load" not in args.skip:
        report["load"] = []
        for quantization in ["none"] + sorted({v.partition("+")[0] for v in variants}):
            cmd = [sys.executable, __file__, "--model", args.model, "--worker", quantization]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            report["load"].append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(report["load"][-1]), file=sys.stderr, flush=True)
    if "errors" not in args.skip and not os.path.isdir(args.model):
        report["requantization"] = requantization_errors(args.model)
    if "matmul" not in args.skip:
        threads = torch.get_num_threads()
        torch.set_num_threads(args.matmul_threads)
        report["matmul_threads"] = args.matmul_threads
        report["matmul"] = matmul_timings([int(m) for m in args.ms.split(",")], args.rounds)
        torch.set_num_threads(threads)
    if "compare" not in args.skip:
        report["compare"] = compare(args.model, variants, bf16=not args.no_bf16, rounds=args.rounds,
                                    accuracy="accuracy" not in args.skip)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
