"""K-quant matrices kept as stored against requantized to int8, on a K-quant-heavy model.

    PYTHONPATH=. python benchmarks/kquant_formats.py [--shape 0.6b|1.7b|4b] [--rounds 5] [--keep FILE]
    PYTHONPATH=. python benchmarks/kquant_formats.py --model default   # a GGUF at hand instead
    PYTHONPATH=. python benchmarks/kquant_formats.py --matmuls         # per matrix, no model
    PYTHONPATH=. python benchmarks/kquant_formats.py --parts [--model default]  # q/k/v of mixed types

The default model is mostly Q5_0 (its 896-wide rows do not fit K-quants' 256-value
super-blocks), so it says little about how a Qwen GGUF whose matrices are Q4_K / Q6_K runs. No
such file can be fetched here, so this writes one: a Qwen3 of the chosen shape (hidden size,
layers, heads as published) laid out as llama.cpp's Q4_K_M lays it out (Q4_K matrices; Q6_K for
attn_v and ffn_down in the first and last eighth of the layers and every third between; F32
norms; a tied Q6_K token embedding), its blocks random but valid (every bit pattern of values
and scales, the fp16 super-block scales small), the default model's tokenizer copied in. What it
says is nonsense; how fast it says it is what a real file of that layout would be.

It loads that file twice in one process, once as `--quantization gguf` (the K-quants as stored)
and once as `--quantization auto` where that requantizes them to int8 (on CPUs outside
`K_QUANTS_STORED_ISAS`), and alternates `qwenkit bench`'s
measurements between them: prefill tok/s of a 512-token prompt, decode tok/s of 1 and of 8
streams. Prints each round and the medians, and the resident size of each copy of the weights.

`--parts` compares instead, on the same file, `auto` as it is (a fused q/k/v whose parts are
stored in different types keeps a format per part) against `auto` with such a matrix int8 as a
whole, as it was before per-part formats.

`--matmuls` times single matmuls instead: int8, Q4_K and Q6_K on Qwen shapes at 1, 8, 32 and 128
activation rows, the calls alternating and each matrix one of 8 copies taken in turn (so that
its weights come from memory, as in a forward pass), microseconds per call, min and median.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gguf  # noqa: E402

SHAPES = {  # Qwen3 configs as published: hidden, layers, heads, kv heads, intermediate
    "0.6b": (1024, 28, 16, 8, 3072),
    "1.7b": (2048, 28, 16, 8, 6144),
    "4b": (2560, 36, 32, 8, 9728),
}
HEAD_DIM = 128
SCALE_OFFSETS = {gguf.GGMLQuantizationType.Q4_K: (0, 2), gguf.GGMLQuantizationType.Q6_K: (208,)}


def _blocks(rows: int, cols: int, tensor_type, rng) -> np.ndarray:
    values, size = gguf.GGML_QUANT_SIZES[tensor_type]
    raw = rng.integers(0, 256, (rows * cols // values, size), dtype=np.uint8)
    for offset in SCALE_OFFSETS[tensor_type]:
        raw[:, offset : offset + 2] = np.full((len(raw), 1), 2e-4, np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def write_q4_k_m(path: Path, shape: str, tokenizer_source: Path) -> Path:
    """A Qwen3 GGUF of `shape` in Q4_K_M's layout (module docstring), the tokenizer of
    `tokenizer_source` (a Qwen GGUF)."""
    hidden, layers, heads, kv_heads, intermediate = SHAPES[shape]
    source = gguf.GGUFReader(tokenizer_source)
    tokens = [bytes(source.fields["tokenizer.ggml.tokens"].parts[i]).decode("utf-8")
              for i in source.fields["tokenizer.ggml.tokens"].data]
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_block_count(layers)
    writer.add_context_length(40960)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_freq_base(1000000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([int(source.fields["tokenizer.ggml.token_type"].parts[i][0])
                            for i in source.fields["tokenizer.ggml.token_type"].data])
    writer.add_token_merges([bytes(source.fields["tokenizer.ggml.merges"].parts[i]).decode("utf-8")
                             for i in source.fields["tokenizer.ggml.merges"].data])
    for key, add in (("tokenizer.ggml.eos_token_id", writer.add_eos_token_id),
                     ("tokenizer.ggml.padding_token_id", writer.add_pad_token_id),
                     ("tokenizer.ggml.bos_token_id", writer.add_bos_token_id)):
        if key in source.fields:
            add(int(source.fields[key].parts[-1][0]))
    if "tokenizer.chat_template" in source.fields:
        field = source.fields["tokenizer.chat_template"]
        writer.add_chat_template(bytes(field.parts[field.data[0]]).decode("utf-8"))
    rng = np.random.default_rng(0)
    q4, q6 = gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K
    writer.add_tensor("token_embd.weight", _blocks(vocab, hidden, q6, rng), raw_dtype=q6)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        more_bits = i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2
        matrices = {
            "attn_q": (heads * HEAD_DIM, hidden, q4), "attn_k": (kv_heads * HEAD_DIM, hidden, q4),
            "attn_v": (kv_heads * HEAD_DIM, hidden, q6 if more_bits else q4),
            "attn_output": (hidden, heads * HEAD_DIM, q4), "ffn_gate": (intermediate, hidden, q4),
            "ffn_up": (intermediate, hidden, q4), "ffn_down": (hidden, intermediate, q6 if more_bits else q4),
        }
        for name, (rows, cols, tensor_type) in matrices.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", _blocks(rows, cols, tensor_type, rng), raw_dtype=tensor_type)
        for name, size in (("attn_norm", hidden), ("ffn_norm", hidden), ("attn_q_norm", HEAD_DIM),
                           ("attn_k_norm", HEAD_DIM)):
            writer.add_tensor(f"blk.{i}.{name}.weight", np.ones(size, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


MATMUL_SHAPES = {  # name: (N, K)
    "0.5B down 896x4864": (896, 4864),
    "0.6B gate_up 6144x1024": (6144, 1024),
    "0.6B down 1024x3072": (1024, 3072),
    "8B o_proj 4096x4096": (4096, 4096),
}


def time_matmuls(rounds: int) -> None:
    import torch

    from qwenkit import kernels
    from qwenkit.models.quant import quantize_int8

    copies, rng = 8, np.random.default_rng(1)
    print("us per call, min / median; ratio: median against int8's", flush=True)
    for shape, (n, k) in MATMUL_SHAPES.items():
        q, scale = quantize_int8(torch.randn(n, k) * 0.05)
        weights = {"int8": [(q.clone(), scale.to(torch.bfloat16)) for _ in range(copies)]}
        for name in ("Q4_K", "Q6_K"):
            tensor_type = gguf.GGMLQuantizationType[name]
            weights[name] = [torch.from_numpy(_blocks(n, k, tensor_type, rng)) for _ in range(copies)]
        for rows in (1, 8, 32, 128):
            x = torch.randn(rows, k)
            times: dict[str, list[float]] = {name: [] for name in weights}
            for i in range(max(rounds, 2560 // rows)):
                for name, copies_ in weights.items():
                    w = copies_[i % copies]
                    start = time.perf_counter()
                    if name == "int8":
                        kernels.int8_linear(x, *w)
                    else:
                        kernels.gguf_linear(x, w, k, name)
                    times[name].append((time.perf_counter() - start) * 1e6)
            medians = {name: statistics.median(t) for name, t in times.items()}
            print(f"  {shape} rows {rows}: " + "  ".join(
                f"{name} {min(t):.0f} / {medians[name]:.0f} ({medians[name] / medians['int8']:.2f})"
                for name, t in times.items()), flush=True)


def _weights_mib(llm) -> float:
    import torch

    seen, total = set(), 0
    for tensor in [*llm.engine.runner.model.parameters(), *llm.engine.runner.model.buffers()]:
        if isinstance(tensor, torch.Tensor) and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="0.6b")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--keep", type=Path, help="write the GGUF here (and reuse it if it is there)")
    parser.add_argument("--model", help="time this GGUF (a path, or 'default') instead of writing one")
    parser.add_argument("--matmuls", action="store_true", help="time single matmuls instead (see above)")
    parser.add_argument("--parts", action="store_true",
                        help="compare q/k/v of mixed types a format per part against int8 as a whole (see above)")
    args = parser.parse_args()
    if args.matmuls:
        time_matmuls(args.rounds)
        return 0

    from qwenkit.bench import _decode, _prompt, _time_first_token
    from qwenkit.default_model import default_model_path
    from qwenkit.kernels import describe
    from qwenkit.llm import LLM
    from qwenkit.sampling import SamplingParams

    folder = tempfile.TemporaryDirectory()
    path = args.keep or Path(folder.name) / f"qwen3-{args.shape}-q4_k_m-layout.gguf"
    if args.model:
        path = default_model_path() if args.model == "default" else Path(args.model)
    elif not path.exists():
        start = time.perf_counter()
        write_q4_k_m(path, args.shape, default_model_path())
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.0f} s")
    print(f"kernels: {describe()}")
    from qwenkit.loader import quantization

    kwargs = dict(device="cpu", progress=False, max_model_len=2048, max_num_seqs=8, speculative="off")
    if args.parts:
        llms = {"a format per part": LLM(str(path), quantization="auto", **kwargs)}
        per_part = quantization._linear_format
        quantization._linear_format = lambda linear, wanted: (
            quantization.INT8 if isinstance(format := per_part(linear, wanted), tuple) else format)
        try:
            llms["mixed q/k/v int8 as a whole"] = LLM(str(path), quantization="auto", **kwargs)
        finally:
            quantization._linear_format = per_part
    else:
        llms = {"K-quants as stored": LLM(str(path), quantization="gguf", **kwargs)}
        measured_isas = quantization.K_QUANTS_STORED_ISAS
        quantization.K_QUANTS_STORED_ISAS = ()  # "auto" as it is where the K-quants become int8
        try:
            llms["K-quants as int8"] = LLM(str(path), quantization="auto", **kwargs)
        finally:
            quantization.K_QUANTS_STORED_ISAS = measured_isas
    gc.collect()
    for name, llm in llms.items():
        print(f"{name}: weights {_weights_mib(llm):.0f} MiB")
        llm.generate([list(range(100, 116))], SamplingParams(max_tokens=2))
    results = {name: {"prefill": [], "decode 1": [], "decode 8": []} for name in llms}
    for round_ in range(args.rounds):
        for name, llm in llms.items():
            r = results[name]
            prompt = _prompt(llm, args.prompt_tokens, 50 + round_)
            r["prefill"].append(len(prompt) / _time_first_token(llm, prompt))
            r["decode 1"].append(_decode(llm, 1, 64, salt=round_))
            r["decode 8"].append(_decode(llm, 8, 32, salt=round_))
            print(f"round {round_}: {name}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in r.items()), flush=True)
    print("medians, tok/s:")
    for name, r in results.items():
        print(f"  {name}: " + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in r.items()))
    (a, ra), (b, rb) = results.items()
    print(f"  {a} / {b}: " + ", ".join(f"{k} {statistics.median(ra[k]) / statistics.median(rb[k]):.2f}x" for k in ra))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
