"""The kernels model code calls: one entry per op, which decides which implementation runs.

Each op lives in a module of `ops/` (norms, activation, rotary, attention, quantized matmuls,
experts) beside the names of its implementations, all of one signature (tests/test_kernels.py
holds them equal); this package re-exports the entries, with batch invariance
(`batch_invariance`), the fused CPU decode step (`decode_layers`) and `describe`. Each entry
takes and returns tensors and picks its implementation from the tensors' device and dtype, so
model code never asks what it runs on:

- **CPU**: C kernels (`csrc/`, built once per CPU and source hash by `build`, called through
  the ctypes bindings of `cpu`), compiled for the widest instruction set the CPU has (AVX2,
  AVX-512 VNNI, AMX; `cpu.selected_isa`), where the dtype and layout are ones they take;
- **CUDA**: the Triton kernels of `kernels/cuda/` (attention over the paged cache in place,
  fused norms, the QK-norm + rotary + cache-write prologue, SwiGLU), and MoE as grouped GEMMs
  with no host sync (`cuda.applies(tensor)` decides; it never imports Triton on a CPU run);
- everywhere else, and where no kernel applies (no C compiler, `QWENKIT_NATIVE_KERNELS=0`):
  the torch code of `reference`, which the tests also hold every kernel against.

Under `torch.compile` the kernels whose work dynamo cannot trace (a ctypes call, a loop over
the experts a routing picked, a cache written in place) are torch custom ops with fake
implementations (`qwenkit::int8_linear`, `qwenkit::gguf_linear`, `qwenkit::write_kv_cache`,
`qwenkit::paged_decode_attention`, `qwenkit::fused_experts`); the elementwise ones (norms, rotary) trace their torch code, which
inductor fuses. Eager calls go to the kernels directly: calling a Python custom op adds
~170 us of dispatch per call (measured here on a 64x64 int8 matmul: 243 against 70 us), more
than a decode-time kernel itself. `describe()` names what runs (`qwenkit bench` and the
server's start-up line print it).

Why ctypes and gcc rather than `torch.utils.cpp_extension`, measured on the 2-core AVX2 machine
of docs/benchmarks.md (torch 2.13.0, gcc 12.2, machine shared and loaded): a one-function
extension (an RMSNorm, C++ against torch's headers) took ~45 s of CPU to build with
`cpp_extension.load`, and needs ninja and the Python headers, which a fresh machine may lack;
gcc builds all of csrc/ in ~4 s of CPU and needs only a C compiler. Calling through ctypes is
slower (35 us against 19 us a call for that RMSNorm, best of 7 rounds, loaded machine), which
the fused decode step makes moot: it is one ctypes call for all layers of a step. The kernels
take raw pointers and need nothing from libtorch.
"""


from __future__ import annotations

import torch

from qwenkit.kernels import cpu, cuda
from qwenkit.kernels.batch_invariance import INVARIANT_ROWS, batch_invariant, is_batch_invariant, linear
from qwenkit.kernels.cpu import DEQUANTIZED_BLOCKS, GGUF_BLOCKS, MOE_BLOCKS, PACKED_ROWS, gguf_row_bytes
from qwenkit.kernels.decode_layers import DecodeLayer, DecodeLayers, DecodeLinear
from qwenkit.kernels.ops.activation import silu_and_mul
from qwenkit.kernels.ops.attention import (
    native_prefill_attention,
    paged_decode_attention,
    paged_prefill_attention,
    write_kv_cache,
)
from qwenkit.kernels.ops.linear import (
    K_QUANTS,
    MAX_KERNEL_TOKENS,
    MAX_NATIVE_KERNEL_TOKENS,
    NATIVE_ROW_INVARIANT,
    gguf_dequantize,
    gguf_linear,
    gguf_pack,
    has_gguf_kernel,
    int4_linear,
    int8_linear,
    packed_row_step,
)
from qwenkit.kernels.ops.moe import fused_experts, gguf_experts, moe_syncs_with_host
from qwenkit.kernels.ops.norm import add_rms_norm, rms_norm
from qwenkit.kernels.ops.rotary import qk_norm_rope_cache, rotary

__all__ = [
    "DEQUANTIZED_BLOCKS", "GGUF_BLOCKS", "INVARIANT_ROWS", "K_QUANTS", "MAX_KERNEL_TOKENS", "MAX_NATIVE_KERNEL_TOKENS",
    "MOE_BLOCKS", "NATIVE_ROW_INVARIANT", "PACKED_ROWS", "DecodeLayer", "DecodeLayers", "DecodeLinear",
    "add_rms_norm", "batch_invariant", "describe", "fused_experts", "gguf_dequantize", "gguf_experts", "gguf_linear",
    "gguf_pack", "gguf_row_bytes", "has_gguf_kernel", "packed_row_step", "int4_linear", "int8_linear", "is_batch_invariant", "linear",
    "moe_syncs_with_host", "native_prefill_attention", "paged_decode_attention", "paged_prefill_attention",
    "qk_norm_rope_cache", "rms_norm", "rotary", "silu_and_mul", "summary", "write_kv_cache",
]


# -- what runs ---------------------------------------------------------------------------------


def describe(device: torch.device | str = "cpu") -> dict[str, str]:
    """Which implementation each kernel runs on `device` (on CPU: float32 activations, unless
    the line says otherwise)."""
    device = torch.device(device)
    if device.type != "cpu":
        if not cuda.enabled(device):
            return {"kernels": "torch"}
        grouped = not moe_syncs_with_host(torch.bfloat16, device)
        return {
            "attention": "Triton: paged decode and varlen prefill, the cache read in place",
            "qk_norm, rotary, cache write": "Triton (one kernel a layer)",
            "rms_norm (+ residual add), silu_and_mul": "Triton",
            "fused_experts": "grouped GEMM (torch._grouped_mm), no host sync" if grouped
            else "torch (loop over the experts in use)",
            "matmuls": "cuBLAS",
        }
    lib = cpu.library()
    if lib is None:
        return {
            "cpu_isa": "none (torch code)",
            "int8_linear": f"torch (_weight_int8pack_mm up to {MAX_KERNEL_TOKENS} rows, then dequantize + GEMM)",
            "gguf_linear": "torch (dequantize + GEMM)",
            "decode_attention": "torch (gather + SDPA)",
            "prefill_attention": "torch (gather + SDPA)",
            "norms, rotary, silu_and_mul": "torch",
            "decode_layers": "off (torch modules)",
            "int4_linear": "torch (_weight_int4pack_mm_for_cpu)",
            "fused_experts": "torch (grouped by expert)",
            "gguf_experts": "torch (each expert in use dequantized)",
        }
    native = f"C {lib.isa}"
    return {
        "cpu_isa": lib.isa,
        "int8_linear": f"{native}: {cpu.DOT_PRODUCTS[lib.isa]}",
        "gguf_linear": f"{native}: {', '.join(GGUF_BLOCKS)} in their blocks (Q5_0 8 rows interleaved)",
        "decode_attention": f"{native} (paged, in place)",
        "prefill_attention": f"{native} (paged, in place, online softmax)" if lib.isa != "generic"
        else "torch (gather + SDPA)",
        "norms, rotary, silu_and_mul": f"{native} (float32)" if lib.isa == "generic"
        else f"{native} (float32; bfloat16 / float16 too, with the attention prologue in one pass)",
        "decode_layers": f"{native} (one call per decode step)",
        "int4_linear": "torch (_weight_int4pack_mm_for_cpu)",
        "fused_experts": "torch (grouped by expert)",
        "gguf_experts": f"{native}: {', '.join(MOE_BLOCKS)} experts in their blocks (one call a layer)",
    }


def summary(device: torch.device | str = "cpu") -> str:
    """One line for start-up messages: the kernels `device` runs."""
    if torch.device(device).type != "cpu":
        if not cuda.enabled(torch.device(device)):
            return f"{torch.device(device).type} kernels: torch"
        return f"{torch.device(device).type} kernels: Triton (paged attention, fused norms and prologue), cuBLAS"
    lib = cpu.library()
    if lib is None:
        return "CPU kernels: torch code (native kernels off or not built)"
    return f"CPU kernels: C {lib.isa} (int8 dot products: {cpu.DOT_PRODUCTS[lib.isa]})"
