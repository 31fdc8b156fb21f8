"""The 16-bit norm, SwiGLU and attention-prologue kernels against the torch code they replace.

    python benchmarks/bench_norm_kernels.py [--tokens 257] [--threads 1] [--repeats 15]

One prefill step of the Qwen3-Embedding-0.6B shape (hidden 1024, intermediate 3072, 16 / 8
heads of 128) in bfloat16: `rms_norm` [T, 1024], `add_rms_norm`, `silu_and_mul` [T, 2 x 3072]
and `qk_norm_rope_cache` (a bfloat16 cache) through the torch reference and through each C
variant this CPU runs (the plain C build included, which the dispatch leaves out for 16-bit
rows). The implementations take turns, `--repeats` times; medians, and each one's speed
against torch's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import qwenkit  # noqa: F401 - before torch: its OpenMP settings (docs/decode.md#threads)
import torch

from qwenkit.kernels import cpu, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=257)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype, t, g = torch.bfloat16, args.tokens, torch.Generator().manual_seed(0)
    x, residual = (torch.randn(t, 1024, generator=g).to(dtype) for _ in range(2))
    weight, gate_up = torch.randn(1024, generator=g).to(dtype), torch.randn(t, 6144, generator=g).to(dtype)
    qkv = torch.randn(t, (16 + 2 * 8) * 128, generator=g).to(dtype)
    angles = torch.arange(t)[:, None] * (1.0 / 1e6 ** (torch.arange(0, 128, 2).float() / 128))[None]
    angles = torch.cat((angles, angles), -1)[:, None]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    norms = dict(q_norm=torch.randn(128, generator=g).to(dtype), k_norm=torch.randn(128, generator=g).to(dtype))
    cache = tuple(torch.empty(4096, 8, 128, dtype=dtype) for _ in range(2))
    slots = torch.randperm(4096, generator=g)[:t]
    ops = {
        "rms_norm": lambda m: m.rms_norm(x, weight, 1e-6),
        "add_rms_norm": lambda m: m.add_rms_norm(x, residual, weight, 1e-6),
        "silu_and_mul": lambda m: m.silu_and_mul(gate_up),
        "qk_norm_rope_cache": lambda m: m.qk_norm_rope_cache(qkv, cos, sin, cache, slots, num_heads=16,
                                                             num_kv_heads=8, head_dim=128, eps=1e-6, **norms),
    }
    # amx: these kernels are its AVX-512 code (AMX serves only the int8 matmuls)
    impls = {"torch": reference, **{isa: cpu.load(isa) for isa in cpu.supported_isas() if isa != "amx"}}
    print(f"{t} tokens, bfloat16, {args.threads} thread(s), median of {args.repeats} alternating runs")
    for op, fn in ops.items():
        seconds: dict[str, list[float]] = {k: [] for k in impls}
        for impl in impls.values():
            fn(impl)
        for _ in range(args.repeats):
            for name, impl in impls.items():
                start = time.perf_counter()
                fn(impl)
                seconds[name].append(time.perf_counter() - start)
        base = statistics.median(seconds["torch"])
        print(f"  {op:20s} " + "  ".join(f"{name} {statistics.median(s) * 1e6:6.0f} us ({base / statistics.median(s):.1f}x)"
                                          for name, s in seconds.items()))


if __name__ == "__main__":
    main()
