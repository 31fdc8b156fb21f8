"""Decode attention over the paged KV cache: the native kernel (reads the cache in place)
against the torch reference (gathers whole blocks, one masked SDPA) and the per-sequence
loop qwenkit had before (gather each sequence's slots, one SDPA each).

    python benchmarks/bench_decode_attention.py [--heads 14 --kv-heads 2 --head-dim 64] [--repeats 30]

Shapes default to the default model (Qwen2.5-Coder-0.5B); one layer, scattered blocks of
16 slots. Timed alternately in one process, medians in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from qwenkit.kernels import cpu, paged_decode_attention, reference


def per_sequence_loop(q, k_cache, v_cache, block_tables, context_lens, *, block_size, scale):
    outs = []
    offsets = torch.arange(block_size)
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        slots = (block_tables[b, : -(-n // block_size)].long()[:, None] * block_size + offsets).flatten()[:n]
        k = k_cache.index_select(0, slots).transpose(0, 1)[None]
        v = v_cache.index_select(0, slots).transpose(0, 1)[None]
        outs.append(F.scaled_dot_product_attention(q[b : b + 1, :, None], k, v, scale=scale, enable_gqa=True)[0, :, 0])
    return torch.stack(outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if cpu.library() is None:
        raise SystemExit("the native kernel could not be built (no C compiler?)")
    block_size, num_blocks = 16, 8192
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(num_blocks * block_size, args.kv_heads, args.head_dim, generator=g)
    v_cache = torch.randn(num_blocks * block_size, args.kv_heads, args.head_dim, generator=g)
    scale = args.head_dim**-0.5
    def cache_in(dtype):
        caches = (k_cache.to(dtype), v_cache.to(dtype))
        return lambda q, k, v, *rest, **kw: paged_decode_attention(q, *caches, *rest, **kw)

    impls = {"native": paged_decode_attention, "native f16": cache_in(torch.float16),
             "native bf16": cache_in(torch.bfloat16), "reference": reference.paged_decode_attention,
             "loop": per_sequence_loop}
    print(f"threads {torch.get_num_threads()}, heads {args.heads}/{args.kv_heads}, head_dim {args.head_dim}")
    print(f"{'seqs':>4}  {'context':>7}  " + "  ".join(f"{name + ' us':>12}" for name in impls))
    for num_seqs, context in [(1, 100), (8, 100), (32, 100), (1, 4000), (8, 1024)]:
        width = -(-context // block_size)
        tables = torch.randperm(num_blocks, generator=g)[: num_seqs * width].view(num_seqs, width).to(torch.int32)
        lens = torch.full((num_seqs,), context, dtype=torch.int32)
        q = torch.randn(num_seqs, args.heads, args.head_dim, generator=g)
        times = {name: [] for name in impls}
        for _ in range(args.repeats):
            for name, fn in impls.items():
                start = time.perf_counter()
                fn(q, k_cache, v_cache, tables, lens, block_size=block_size, scale=scale)
                times[name].append(time.perf_counter() - start)
        print(f"{num_seqs:>4}  {context:>7}  "
              + "  ".join(f"{statistics.median(t) * 1e6:>12.0f}" for t in times.values()), flush=True)


if __name__ == "__main__":
    main()
