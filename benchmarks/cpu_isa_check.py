"""Every ISA variant of qwenkit's CPU kernels on this machine: correctness, then speed.

    PYTHONPATH=. python benchmarks/cpu_isa_check.py [--threads N] [--quick] [--json FILE]

Self-contained: needs torch and this repository only (no model file, no pytest), and a C
compiler; about a minute. It prints the CPU's flags and which variants this CPU runs, builds
every variant (a variant the CPU cannot run must still compile), then for each variant it runs:

- correctness against the torch reference: int8 and GGUF Q5_0 matmuls at 1-37 rows against the
  float64 product with the dequantized weight, within the bound of the activations' int8
  rounding; rows that must not depend on the rest of the batch (< 16 rows); paged decode
  attention, RMSNorm and rotary against `qwenkit.kernels.reference`;
- speed: milliseconds per call of the int8, Q5_0 and K-quant (Q4_K, Q6_K; where K is whole
  super-blocks) matmuls on the default model's shapes and a Qwen3-8B-sized one, at 1 row (decode,
  memory-bound), 8 rows (8 streams), 32 rows and 128 rows
  (prefill), next to torch's own paths for the same product (float32 GEMM on dequantized
  weights, and bfloat16 where the CPU has AVX512-BF16 / AMX-BF16: the prefill path of a
  bfloat16 model); and paged decode attention at 1,024 tokens of context.

Exit status 1 if a variant this CPU runs fails a check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from qwenkit.kernels import build, cpu, reference  # noqa: E402

SHAPES = {  # name: (N, K)
    "0.5B gate_up 9728x896": (9728, 896),
    "0.5B down 896x4864": (896, 4864),
    "8B o_proj 4096x4096": (4096, 4096),
}
ROWS = (1, 8, 32, 128)


def _weights(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def _quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from qwenkit.models.quant import quantize_int8

    q, scale = quantize_int8(w)
    return q, scale.to(torch.bfloat16)


def _q5_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [N, K / 32 * 22] in the kernels' layout, gguf's dequantization float32 [N, K])."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from qwenkit.kernels import reference

    blocks = quantize(w.numpy(), GGMLQuantizationType.Q5_0)
    packed = reference.gguf_pack(torch.from_numpy(blocks), w.shape[1], "Q5_0")
    return packed, torch.from_numpy(dequantize(blocks, GGMLQuantizationType.Q5_0))


def _k_quant(type_name: str, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random valid K-quant super-blocks for [n, k] (small fp16 scales) and gguf's dequantization."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    tensor_type = GGMLQuantizationType[type_name]
    values, size = GGML_QUANT_SIZES[tensor_type]
    raw = np.random.default_rng(seed).integers(0, 256, (n * k // values, size), dtype=np.uint8)
    for offset in {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[type_name]:
        raw[:, offset : offset + 2] = np.full((len(raw), 1), 2e-4 / max(1, k // 1024), np.float16).view(np.uint8)
    raw = raw.reshape(n, -1)
    return torch.from_numpy(raw), torch.from_numpy(dequantize(raw, tensor_type))


def _q8_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 in blocks of 32 moves each x_k by at most amax(block) / 254; + float32 rounding."""
    k = x.shape[1]
    amax = torch.stack([b.abs().amax(dim=1) for b in x.double().split(32, dim=1)], dim=1)
    step = amax.repeat_interleave(32, dim=1)[:, :k] / 254
    return step @ w.double().abs().T + 1e-5 * (x.double().abs() @ w.double().abs().T)


def check(lib: cpu.Library) -> list[str]:
    """The failures of `lib` against the reference (empty: all good)."""
    failures = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)

    w = _weights(37, 416, 0)
    w[3] *= 20
    q, scale = _quantize_int8(w)
    w8 = q.double() * scale.double()[:, None]
    blocks, w5 = _q5_0(w)
    for rows in (1, 3, 8, 11, 16, 37):
        x = torch.randn(rows, 416, generator=torch.Generator().manual_seed(rows)) * torch.linspace(0.1, 3, 416)
        for name, y, ref in (("int8", lib.int8_linear(x, q, scale), w8),
                             ("Q5_0", lib.gguf_linear(x, blocks, 416, "Q5_0"), w5.double())):
            error = (y.double() - x.double() @ ref.T).abs()
            expect(bool(torch.all(error <= _q8_bound(x, ref))), f"{name} matmul, {rows} rows: outside the bound "
                   f"(worst {float((error / _q8_bound(x, ref)).max()):.2f}x)")
        if rows < 16:
            for name, fn in (("int8", lambda t: lib.int8_linear(t, q, scale)),
                             ("Q5_0", lambda t: lib.gguf_linear(t, blocks, 416, "Q5_0"))):
                together = fn(x)
                expect(all(torch.equal(fn(x[i : i + 1])[0], together[i]) for i in range(rows)),
                       f"{name} matmul, {rows} rows: a row's result depends on the other rows")
    expect(torch.equal(lib.gguf_dequantize(blocks, 416, "Q5_0"), w5), "Q5_0 dequantization differs from gguf's")
    for type_name in ("Q4_K", "Q5_K", "Q6_K"):
        kblocks, wk = _k_quant(type_name, 21, 512, 3)
        expect(torch.equal(lib.gguf_dequantize(kblocks, 512, type_name), wk),
               f"{type_name} dequantization differs from gguf's")
        for rows in (1, 3, 8, 13):
            x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
            y = lib.gguf_linear(x, kblocks, 512, type_name)
            error = (y.double() - x.double() @ wk.double().T).abs()
            expect(bool(torch.all(error <= _q8_bound(x, wk))), f"{type_name} matmul, {rows} rows: outside the bound")
            expect(all(torch.equal(lib.gguf_linear(x[i : i + 1], kblocks, 512, type_name)[0], y[i])
                       for i in range(rows)), f"{type_name} matmul, {rows} rows: depends on the other rows")

    g = torch.Generator().manual_seed(0)
    block_size, heads, kv_heads, dim = 16, 14, 2, 64
    k_cache, v_cache = (torch.randn(40 * block_size, kv_heads, dim, generator=g) for _ in range(2))
    context_lens = torch.tensor([1, 16, 17, 90, 0], dtype=torch.int32)
    tables = torch.randperm(40, generator=g)[:30].view(5, 6).to(torch.int32)
    qh = torch.randn(5, heads, dim, generator=g)
    kwargs = dict(block_size=block_size, scale=dim**-0.5)
    got = lib.paged_decode_attention(qh, k_cache, v_cache, tables, context_lens, **kwargs)
    want = reference.paged_decode_attention(qh, k_cache, v_cache, tables, context_lens, **kwargs)
    expect(torch.allclose(got, want, atol=1e-5, rtol=1e-4), "paged decode attention differs from the reference")
    x, weight = torch.randn(5, 96, generator=g) * 3, torch.randn(96, generator=g)
    expect(torch.allclose(lib.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6), atol=1e-6, rtol=1e-5),
           "RMSNorm differs from the reference")
    angles = torch.rand(5, 1, dim // 2, generator=g) * 6
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    expect(torch.allclose(lib.rotary(qh, cos, sin), reference.rotary(qh, cos, sin), atol=1e-6, rtol=1e-5),
           "rotary differs from the reference")
    return failures


def _clock(fn, budget: float) -> float:
    """Best ms per call over about `budget` seconds."""
    fn()
    best, spent = float("inf"), 0.0
    while spent < budget:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return best * 1e3


def speed(libs: dict[str, cpu.Library], budget: float) -> list[dict]:
    flags = cpu.cpu_flags()
    half = "amx_bf16" in flags or "avx512_bf16" in flags
    rows = []
    for shape, (n, k) in SHAPES.items():
        w = _weights(n, k, 1)
        q, scale = _quantize_int8(w)
        blocks, w5 = _q5_0(w)
        k_quants = {t: _k_quant(t, n, k, 2)[0] for t in ("Q4_K", "Q6_K")} if k % 256 == 0 else {}
        w8 = (q.float() * scale.float()[:, None]).contiguous()
        w8_half = w8.to(torch.bfloat16)
        for m in ROWS:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            row = {"matrix": shape, "rows": m}
            for isa, lib in libs.items():
                if isa == "generic":  # plain C, the fallback: checked above, too slow to time here
                    continue
                row[f"int8 {isa}"] = _clock(lambda: lib.int8_linear(x, q, scale), budget)
                row[f"Q5_0 {isa}"] = _clock(lambda: lib.gguf_linear(x, blocks, k, "Q5_0"), budget)
                for type_name, kblocks in k_quants.items():
                    row[f"{type_name} {isa}"] = _clock(lambda: lib.gguf_linear(x, kblocks, k, type_name), budget)
            row["torch float32 GEMM"] = _clock(lambda: torch.nn.functional.linear(x, w8), budget)
            if half:
                xh = x.to(torch.bfloat16)
                row["torch bfloat16 GEMM"] = _clock(lambda: torch.nn.functional.linear(xh, w8_half), budget)
            rows.append(row)
            print("  " + "  ".join(f"{key}: {value:.3f}" if isinstance(value, float) else f"{value}"
                                   for key, value in row.items()), flush=True)
    g = torch.Generator().manual_seed(0)
    block_size, heads, kv_heads, dim, context = 16, 32, 8, 128, 1024
    blocks_needed = 8 * context // block_size
    k_cache, v_cache = (torch.randn(blocks_needed * block_size, kv_heads, dim, generator=g) for _ in range(2))
    tables = torch.randperm(blocks_needed, generator=g).view(8, -1).to(torch.int32)
    lens = torch.full((8,), context, dtype=torch.int32)
    qh = torch.randn(8, heads, dim, generator=g)
    row = {"matrix": f"decode attention, 8 seqs x {context} tokens, 32/8 heads x 128", "rows": 8}
    for isa, lib in libs.items():
        if isa == "generic":
            continue
        row[f"attention {isa}"] = _clock(lambda: lib.paged_decode_attention(
            qh, k_cache, v_cache, tables, lens, block_size=block_size, scale=dim**-0.5), budget)
    row["attention torch reference"] = _clock(lambda: reference.paged_decode_attention(
        qh, k_cache, v_cache, tables, lens, block_size=block_size, scale=dim**-0.5), budget)
    rows.append(row)
    print("  " + "  ".join(f"{key}: {value:.3f}" if isinstance(value, float) else f"{value}"
                           for key, value in row.items()), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="correctness only, no speed comparison")
    parser.add_argument("--budget", type=float, default=0.15, help="seconds of timing per figure")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    flags = cpu.cpu_flags()
    interesting = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "bmi2")))
    supported = cpu.supported_isas()
    print(f"CPU: {platform.processor() or platform.machine()}; {os.cpu_count()} logical CPUs; torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads")
    print(f"CPU flags: {' '.join(interesting)}")
    print(f"variants this CPU runs: {', '.join(supported)}; qwenkit would pick: {cpu.selected_isa()}")
    report = {"cpu_flags": interesting, "supported": supported, "variants": {}, "speed": []}
    libs, failed = {}, False
    for isa in build.ISA_FLAGS:
        start = time.perf_counter()
        try:
            path = build.build(isa)
        except build.BuildError as e:
            print(f"[{isa}] BUILD FAILED: {e}")
            report["variants"][isa] = "build failed"
            failed = True
            continue
        built = time.perf_counter() - start
        if isa not in supported:
            missing = ", ".join(sorted(cpu.REQUIRED_FLAGS[isa] - flags)) or "x86-64"
            print(f"[{isa}] compiled ({built:.1f} s); not run: this CPU lacks {missing}")
            report["variants"][isa] = f"compiled, not run (lacks {missing})"
            continue
        try:
            lib = cpu.load(isa)
        except cpu.TileStateRefused as e:
            print(f"[{isa}] compiled; not run: {e}")
            report["variants"][isa] = str(e)
            continue
        failures = check(lib)
        print(f"[{isa}] compiled ({built:.1f} s), checked against the reference: "
              + ("OK" if not failures else "FAILED\n    " + "\n    ".join(failures)))
        report["variants"][isa] = "ok" if not failures else failures
        failed |= bool(failures)
        libs[isa] = lib
    if not args.quick:
        print("ms per call (best of ~{:.2f} s each), rows = activation rows:".format(args.budget))
        report["speed"] = speed(libs, args.budget)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print("FAILED" if failed else "all variants this CPU runs agree with the reference")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
