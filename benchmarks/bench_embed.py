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
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()

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
