"""A Qwen3-30B-A3B of Q4_K_M's layout (random weights) in qwenkit and llama.cpp: peak RSS of the
whole model (48 layers, 128 experts, 8 routed), decode tokens/s on a 12-layer cut of it.

    python benchmarks/moe_gguf_30b.py [--dir /tmp] [--threads 2] [--repeats 3] [--keep]

Writes the file with gguf-py (streamed, a tensor at a time: ~18.6 GB, and ~4.9 GB for the cut,
under `--dir`; deleted afterwards unless `--keep`), then runs benchmarks/compare_llamacpp.py on
each: on the full model one short run per engine (a 16-token prompt, 8 new tokens: load and
answer), whose peak RSS is the figure; on the 12-layer cut `--repeats` alternating runs, one and
8 streams. Both engines map the file (llama.cpp's default; qwenkit maps GGUF experts kept in their
K-quant blocks, models/quant.py `GGUFExperts`), so each one's RSS counts the pages of the experts
its tokens were routed to, plus what it copies (qwenkit: the attention matrices and the output
matrix, in their blocks; llama.cpp: nothing on CPU) and its buffers.

Layout, as llama.cpp's Q4_K_M for qwen3moe: token_embd and every matrix Q4_K, except output,
and attn_v and ffn_down_exps of the layers `use_more_bits` picks, which are Q6_K; norms and the
router F32. The blocks are random but valid (K-quant scales and mins centred so values stay near
0, ~0.01), a period of them repeated through each tensor: every page of a tensor is its own in the
file, which is what the memory and speed figures depend on. What the model says is noise.
The vocabulary (151,936 tokens, Qwen2's tokenizer) is copied from the embedded default model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np

T = gguf.GGMLQuantizationType
HERE = Path(__file__).resolve().parent
# Qwen3-30B-A3B's config.json
CONFIG = dict(hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128, experts_used=8, moe_intermediate=768,
              intermediate=6144, vocab=151936, context=40960, rope_theta=1e6, eps=1e-6)
PERIOD_BYTES = 1 << 22  # random blocks per tensor, repeated through it


def use_more_bits(layer: int, num_layers: int) -> bool:
    """llama.cpp's choice (llama-quant.cpp) of the layers whose attn_v / ffn_down get Q6_K in Q4_K_M."""
    return layer < num_layers // 8 or layer >= 7 * num_layers // 8 or (layer - num_layers // 8) % 3 == 2


def tensors(num_layers: int, layout_layers: int = 48, c: dict = CONFIG) -> list[tuple[str, tuple[int, ...], T]]:
    """(GGUF name, shape [.., rows, values a row] as HF orders it, type) of every tensor; each layer's
    types as in a `layout_layers`-layer file (the cut keeps the full model's first layers)."""
    h, e, i = c["hidden"], c["experts"], c["moe_intermediate"]
    q, kv, d = c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"], c["head_dim"]
    out = [("token_embd.weight", (c["vocab"], h), T.Q4_K), ("output_norm.weight", (h,), T.F32),
           ("output.weight", (c["vocab"], h), T.Q6_K)]
    for layer in range(num_layers):
        more = T.Q6_K if use_more_bits(layer, layout_layers) else T.Q4_K
        b = f"blk.{layer}"
        out += [(f"{b}.attn_norm.weight", (h,), T.F32), (f"{b}.ffn_norm.weight", (h,), T.F32),
                (f"{b}.attn_q.weight", (q, h), T.Q4_K), (f"{b}.attn_k.weight", (kv, h), T.Q4_K),
                (f"{b}.attn_v.weight", (kv, h), more), (f"{b}.attn_output.weight", (h, q), T.Q4_K),
                (f"{b}.attn_q_norm.weight", (d,), T.F32), (f"{b}.attn_k_norm.weight", (d,), T.F32),
                (f"{b}.ffn_gate_inp.weight", (e, h), T.F32),
                (f"{b}.ffn_gate_exps.weight", (e, i, h), T.Q4_K), (f"{b}.ffn_up_exps.weight", (e, i, h), T.Q4_K),
                (f"{b}.ffn_down_exps.weight", (e, h, i), more)]
    return out


def random_period(tensor_type: T, num_bytes: int, rng: np.random.Generator) -> np.ndarray:
    """Valid random blocks of `tensor_type`, about `num_bytes` of them."""
    block_values, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
    blocks = rng.integers(0, 256, (max(1, num_bytes // type_size), type_size), dtype=np.uint8)
    if tensor_type == T.Q6_K:  # w = d sc (u - 32): centred; d at the end
        blocks[:, 208:210] = np.full((len(blocks), 1), 1e-4, np.float16).view(np.uint8)
    else:  # Q4_K: every 6-bit scale and min c, dmin = 7.5 d: w = d c (u - 7.5)
        c = rng.integers(1, 16, (len(blocks), 1), dtype=np.uint8)
        blocks[:, 4:12] = c
        blocks[:, 12:16] = c | (c << 4)
        d = np.full((len(blocks), 1), 2e-4, np.float16)
        blocks[:, 0:2] = d.view(np.uint8)
        blocks[:, 2:4] = (d * 7.5).astype(np.float16).view(np.uint8)
    return blocks.reshape(-1)


def write_model(path: Path, num_layers: int, config: dict = CONFIG) -> Path:
    """The random model (`config`'s shape: a smaller one for tests), streamed to `path` a tensor at a time."""
    from qwenkit.default_model import default_model_path
    from qwenkit.gguf_header import read_header

    c = config
    metadata, _ = read_header(default_model_path(progress=False))
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    writer.add_block_count(num_layers)
    writer.add_context_length(c["context"])
    writer.add_embedding_length(c["hidden"])
    writer.add_feed_forward_length(c["intermediate"])
    writer.add_head_count(c["heads"])
    writer.add_head_count_kv(c["kv_heads"])
    writer.add_key_length(c["head_dim"])
    writer.add_value_length(c["head_dim"])
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_layer_norm_rms_eps(c["eps"])
    writer.add_expert_count(c["experts"])
    writer.add_expert_used_count(c["experts_used"])
    writer.add_expert_feed_forward_length(c["moe_intermediate"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(metadata["tokenizer.ggml.tokens"])
    writer.add_token_types(metadata["tokenizer.ggml.token_type"])
    writer.add_token_merges(metadata["tokenizer.ggml.merges"])
    writer.add_eos_token_id(metadata["tokenizer.ggml.eos_token_id"])
    writer.add_pad_token_id(metadata["tokenizer.ggml.padding_token_id"])
    writer.add_bos_token_id(metadata["tokenizer.ggml.bos_token_id"])
    writer.add_chat_template(metadata["tokenizer.chat_template"])
    layout = tensors(num_layers, c=c)
    for name, shape, tensor_type in layout:
        if tensor_type == T.F32:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            block_values, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
            byte_shape = (*shape[:-1], shape[-1] // block_values * type_size)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                   raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shape, tensor_type in layout:
        if tensor_type == T.F32:
            norm = len(shape) == 1
            data = np.ones(shape, np.float32) if norm else (rng.standard_normal(shape) * 0.02).astype(np.float32)
        else:
            block_values, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
            num_bytes = int(np.prod(shape[:-1])) * (shape[-1] // block_values * type_size)
            period = random_period(tensor_type, min(num_bytes, PERIOD_BYTES), rng)
            data = np.resize(period, num_bytes)
        writer.write_tensor_data(data)
    writer.close()
    return path


def compare(model: Path, args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, str(HERE / "compare_llamacpp.py"), "--model", str(model), "--threads", str(args.threads),
           "--no-quality", "--batch-prompts", "0", "--json", *extra]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp"), help="where the two files are written")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3, help="alternating speed runs on the 12-layer cut")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--cut-layers", type=int, default=12)
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--skip-full", action="store_true", help="only the 12-layer cut")
    args = parser.parse_args()
    results: dict = {"load_average_start": os.getloadavg()}
    files = []
    try:
        cut = args.dir / f"qwen3-30b-a3b-random-{args.cut_layers}l-q4_k_m.gguf"
        if not cut.exists():
            start = time.perf_counter()
            files.append(write_model(cut, args.cut_layers))
            print(f"wrote {cut} ({cut.stat().st_size / 1e9:.1f} GB) in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr)
        results["cut"] = compare(cut, args, "--repeats", str(args.repeats), "--streams", "8",
                                 "--prompt-tokens", "64", "--decode-tokens", "32", "--ctx", "1024")
        if not args.skip_full:
            if not args.keep and cut in files:
                cut.unlink()
            full = args.dir / f"qwen3-30b-a3b-random-{args.layers}l-q4_k_m.gguf"
            if not full.exists():
                start = time.perf_counter()
                files.append(write_model(full, args.layers))
                print(f"wrote {full} ({full.stat().st_size / 1e9:.1f} GB) in {time.perf_counter() - start:.0f} s",
                      file=sys.stderr)
            results["full"] = compare(full, args, "--repeats", "1", "--streams", "1", "--prompt-tokens", "16",
                                      "--decode-tokens", "8", "--ctx", "1024")
    finally:
        if not args.keep:
            for path in files:
                path.unlink(missing_ok=True)
    results["load_average_end"] = os.getloadavg()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
