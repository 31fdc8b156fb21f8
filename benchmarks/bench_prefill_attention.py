"""Prefill attention over the paged KV cache: the native kernel (csrc/attention.c: reads the
cache in place, online softmax) against what CPU prefill ran before it, one SDPA per sequence
over its gathered context (`qwenkit.models.attention._attention_per_sequence`: is_causal where
the prompt has no cached prefix, else a boolean mask).

    python benchmarks/bench_prefill_attention.py [--heads 14 --kv-heads 2 --head-dim 64] [--repeats 9]

One layer of the default model's shape (Qwen2.5-Coder-0.5B) by default, a 512-token chunk
(the CPU prefill chunk) with 0 and 512 tokens before it in the cache, scattered blocks of 16
slots, each cache dtype. Timed alternately in one process, medians in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qwenkit.kernels import cpu
from qwenkit.models.attention import AttentionMetadata, _attention_per_sequence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    lib = cpu.library()
    if lib is None:
        raise SystemExit("no native kernels (no C compiler, or QWENKIT_NATIVE_KERNELS=0)")
    print(f"kernels: C {lib.isa}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    block_size, n, dim = 16, args.tokens, args.head_dim
    g = torch.Generator().manual_seed(0)
    for prefix in (0, n):
        blocks = -(-(prefix + n) // block_size)
        table = torch.randperm(blocks + 8, generator=g)[:blocks]
        slots = (table[:, None] * block_size + torch.arange(block_size)).flatten()[: prefix + n]
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            k_cache, v_cache = (torch.randn((blocks + 8) * block_size, args.kv_heads, dim, generator=g).to(dtype)
                                for _ in range(2))
            q = torch.randn(n, args.heads, dim, generator=g)
            ints = dict(dtype=torch.int32)
            meta = AttentionMetadata(query_lens=(n,), context_lens=(prefix + n,), slot_mapping=slots[prefix:],
                                     context_slots=(slots,))
            runs = {
                "native": lambda: lib.paged_prefill_attention(
                    q, k_cache, v_cache, table[None].to(torch.int32), torch.tensor([0, n], **ints),
                    torch.tensor([prefix + n], **ints), max_query_len=n, block_size=block_size, scale=dim**-0.5),
                "gather + SDPA": lambda: _attention_per_sequence(q, k_cache, v_cache, meta, scale=dim**-0.5),
            }
            times = {name: [] for name in runs}
            for name, run in runs.items():
                run()
            for _ in range(args.repeats):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
            native, sdpa = (statistics.median(times[k]) * 1e3 for k in runs)
            cache = str(dtype).removeprefix("torch.")
            print(f"{n} queries after {prefix} cached, {cache} cache: native {native:.2f} ms, "
                  f"gather + SDPA {sdpa:.2f} ms ({sdpa / native:.2f}x)")


if __name__ == "__main__":
    main()
