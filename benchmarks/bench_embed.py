"""Embeddings a second: qwenkit against transformers on the Qwen3-Embedding-0.6B shape.

    python benchmarks/bench_embed.py [--texts 16] [--tokens 256] [--rounds 2] [--layers 28]

Random weights of Qwen3-Embedding-0.6B's shape (28 layers, hidden 1024, 16 / 8 heads of
128, vocabulary 151,669, tied embeddings) are written once to a temporary folder in
bfloat16, with a tiny tokenizer: the texts are random token ids, so no vocabulary is
needed. Each round embeds the same `--texts` texts of `--tokens` tokens (plus the closing
<|endoftext|>, as the model card's tokenizer adds) with

* qwenkit: `qwenkit.embedding.embed` at its default dtype for this machine (bfloat16
  where the CPU computes it natively, else float32), and float32;
* transformers: `Qwen3Model` as the model card runs it (one padded batch of equal-length
  texts, the last token's hidden state, L2-normalised), in float32 and bfloat16.

The prefix cache is off for qwenkit (every round recomputes, as a new text would). The
best round of each is reported, with the embeddings' agreement (max abs difference
against transformers float32). `--layers` shrinks the model for a quick check.

    python benchmarks/bench_embed.py --alternate [--rounds 5] [--engine NAME=SPEC ...]

compares engines turn by turn instead, for a machine whose load changes under the run: each
engine is a process of its own (loaded once, warmed up, then waiting on a pipe), and each
round every engine embeds the same texts once, one after the other, the order rotating from
round to round; the report gives each engine's median and, per engine, the median of its
per-round ratio to the first engine. SPEC is `transformers` or `qwenkit` (bfloat16), with
`,KEY=VALUE` items for that process's environment: `--engine old=qwenkit,PYTHONPATH=/path/to/tree`
runs another checkout's qwenkit beside this one. Default: transformers, then qwenkit. The
load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE_ENV = dict(os.environ)  # before qwenkit is imported here (it sets OpenMP defaults)

import qwenkit  # noqa: F401 - before torch: it sets torch's OpenMP threads to wait passively (docs/decode.md#threads)
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))


def write_checkpoint(folder: Path, num_layers: int) -> None:
    import transformers
    from tiny import make_tokenizer

    make_tokenizer(folder)
    config = transformers.Qwen3Config(
        vocab_size=151669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=num_layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.Qwen3Model(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.02 * torch.randn_like(p))
    model.save_pretrained(folder)


def best_of(rounds: int, fn) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def random_texts(texts: int, tokens: int, eos: int) -> torch.Tensor:
    """[texts, tokens + 1] random ids below Qwen's special tokens, each closed by <|endoftext|>."""
    ids = torch.randint(0, 150000, (texts, tokens), generator=torch.Generator().manual_seed(1))
    return torch.cat([ids, torch.full((texts, 1), eos)], dim=1)


def worker_main(spec: dict) -> None:
    """One engine of --alternate: loads, warms up, says ready, then embeds on each request and
    answers the seconds it took (one JSON line each)."""
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed goes to stderr
    ids = torch.tensor(spec["ids"])
    if spec["kind"] == "transformers":
        import transformers

        model = transformers.Qwen3Model.from_pretrained(spec["folder"], dtype=torch.bfloat16).eval()

        def run() -> None:
            with torch.inference_mode():
                hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, -1]
            torch.nn.functional.normalize(hidden.float(), p=2, dim=1)
    else:
        from qwenkit import LLM
        from qwenkit.embedding import embed

        llm = LLM(spec["folder"], dtype="bfloat16", progress=False, enable_prefix_caching=False)
        prompts = ids.tolist()

        def run() -> None:
            embed(llm, prompts)
    run()  # warm up (kernels built, threads started, weights paged in)
    protocol.write(json.dumps({"threads": torch.get_num_threads(), "module": sys.modules[
        "transformers" if spec["kind"] == "transformers" else "qwenkit"].__file__}) + "\n")
    protocol.flush()
    for _ in sys.stdin:
        start = time.perf_counter()
        run()
        protocol.write(json.dumps({"seconds": time.perf_counter() - start}) + "\n")
        protocol.flush()


class EngineProcess:
    def __init__(self, name: str, spec: str, folder: Path, ids: torch.Tensor):
        kind, *items = spec.split(",")
        if kind not in ("transformers", "qwenkit"):
            raise SystemExit(f"error: engine {name!r}: {kind!r} is not transformers or qwenkit")
        env = dict(BASE_ENV)
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"error: engine {name!r}: {item!r} is not KEY=VALUE")
            env[key] = value
        self.name = name
        payload = {"kind": kind, "folder": str(folder), "ids": ids.tolist()}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(payload)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"error: the {self.name} process exited (code {self.proc.wait()})")
        return json.loads(line)

    def embed(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._reply()["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def alternate(args: argparse.Namespace) -> None:
    from qwenkit.tokenizer import Tokenizer

    specs = [tuple(e.split("=", 1)) for e in args.engine or ["transformers=transformers", "qwenkit=qwenkit"]]
    if any(len(s) != 2 for s in specs):
        raise SystemExit("error: --engine takes NAME=SPEC")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_checkpoint(folder, args.layers)
        ids = random_texts(args.texts, args.tokens, Tokenizer.from_dir(folder).token_to_id("<|endoftext|>"))
        engines = []
        try:
            for name, spec in specs:  # loaded one at a time: a load beside a round would slow it
                engines.append(EngineProcess(name, spec, folder, ids))
                print(f"  {name}: {engines[-1].ready['module']} ({engines[-1].ready['threads']} threads)", flush=True)
            seconds: dict[str, list[float]] = {e.name: [] for e in engines}
            for r in range(args.rounds):
                for e in engines[r % len(engines):] + engines[: r % len(engines)]:
                    seconds[e.name].append(e.embed())
                print(f"  round {r + 1}: " + ", ".join(f"{n} {s[-1]:.2f} s" for n, s in seconds.items()), flush=True)
        finally:
            for e in engines:
                e.close()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    first = specs[0][0]
    print(f"{args.texts} texts x {args.tokens} tokens, {args.layers} layers, bfloat16, {args.rounds} rounds "
          f"alternating; median seconds, and the median of the per-round speed ratios to {first}:")
    for name, s in seconds.items():
        ratios = [a / b for a, b in zip(seconds[first], s)]
        print(f"  {name:14s} {statistics.median(s):7.2f} s  {args.texts / statistics.median(s):6.2f} embeddings/s  "
              f"{statistics.median(ratios):.2f}x {first} (rounds {', '.join(f'{x:.2f}' for x in ratios)})")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker_main(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--alternate", action="store_true", help="engines in turn, each in its own process (above)")
    parser.add_argument("--engine", action="append", metavar="NAME=SPEC", help="with --alternate: an engine (above)")
    args = parser.parse_args()
    if args.alternate:
        return alternate(args)

    import transformers

    from qwenkit import LLM
    from qwenkit.embedding import embed

    generator = torch.Generator().manual_seed(1)
    eos = None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_checkpoint(folder, args.layers)
        results: dict[str, dict] = {}
        reference = None
        for dtype in ("float32", "bfloat16"):
            model = transformers.Qwen3Model.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
            if eos is None:
                from qwenkit.tokenizer import Tokenizer

                eos = Tokenizer.from_dir(folder).token_to_id("<|endoftext|>")
                texts = torch.randint(0, 150000, (args.texts, args.tokens), generator=generator)
                ids = torch.cat([texts, torch.full((args.texts, 1), eos)], dim=1)

            def run_hf():
                with torch.inference_mode():
                    hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, -1]
                return torch.nn.functional.normalize(hidden.float(), p=2, dim=1)

            seconds, out = best_of(args.rounds, run_hf)
            reference = out if reference is None else reference
            results[f"transformers {dtype}"] = {"seconds": seconds, "embeddings_per_s": args.texts / seconds,
                                                "max_abs_diff": float((out - reference).abs().max())}
            del model
        prompts = texts.tolist()
        for dtype in (None, "float32"):
            llm = LLM(str(folder), dtype=dtype, progress=False, enable_prefix_caching=False)
            name = f"qwenkit {str(llm.dtype).removeprefix('torch.')}" + (" (default)" if dtype is None else "")
            if dtype == "float32" and str(llm.dtype) == "torch.float32" and any(k.startswith("qwenkit float32") for k in results):
                continue  # the default was float32 already
            embed(llm, prompts[:1])  # warm up (kernels built, threads started)
            seconds, out = best_of(args.rounds, lambda: embed(llm, prompts).data)
            results[name] = {"seconds": seconds, "embeddings_per_s": args.texts / seconds,
                             "max_abs_diff": float((out - reference).abs().max())}
            del llm
    best_hf = max(v["embeddings_per_s"] for k, v in results.items() if k.startswith("transformers"))
    if args.json:
        print(json.dumps({"texts": args.texts, "tokens": args.tokens, "layers": args.layers, "results": results,
                          "threads": torch.get_num_threads()}))
        return
    print(f"{args.texts} texts x {args.tokens} tokens, {args.layers} layers, torch threads {torch.get_num_threads()}")
    for name, r in results.items():
        print(f"  {name:28s} {r['embeddings_per_s']:7.2f} embeddings/s  ({r['seconds']:.2f} s, "
              f"{r['embeddings_per_s'] / best_hf:.2f}x the best transformers; max |diff| {r['max_abs_diff']:.1e})")


if __name__ == "__main__":
    main()
