"""Which modules a load quantizes, and to which in-memory format (qwenkit/models/quant.py).

quantization="auto": on CPU, GGUF matrices stay quantized, in the format `gguf_auto_formats()`
gives their storage type (the K-quants as stored where their kernels were measured level with
int8 or faster, else int8); "gguf": every type with a native kernel kept as stored
(`GGUF_STORED_FORMATS`: the K-quants too, whatever the CPU), the smallest in memory. Under both, a
fused matrix whose parts are stored in different types keeps a format per part. Float-stored
tensors, safetensors checkpoints, and any checkpoint on another device load as floats; a
pre-quantized safetensors checkpoint (its config's `quantization_config`) keeps the matrices it
stores quantized as stored, on any device, under "auto" (qwenkit/loader/prequantized.py).
"int8" / "int4": every decoder matrix in that format (int8 where a shape does not fit int4), the
embedding and lm_head in int8, as llama.cpp keeps the output matrix at higher precision. "none":
all floats. The MoE router stays float. The experts of a GGUF file stored in K-quants (Q4_K, Q5_K,
Q6_K) stay as stored on CPU under "auto" and "gguf" where the native kernels run (mapped from
the file, `GGUFExperts`); other experts load as floats, except as a pre-quantized checkpoint
stores them (see docs/quantization.md).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from qwenkit import kernels
from qwenkit.errors import ModelLoadError
from qwenkit.loader.prequantized import Prequantization
from qwenkit.loader.weights import _target
from qwenkit.models.layers import Embedding, FusedExperts, Linear
from qwenkit.models.prequantized import StoredFormat
from qwenkit.models.quant import GGUF, GGUF_LINEAR_FORMATS, INT4, INT4_GROUP_SIZE, INT8, Q4_K, Q5_0, Q5_K, Q6_K

QUANTIZATION_CHOICES = ("auto", "gguf", "none", "int8", "int4")

# GGUF storage type -> in-memory format under "auto", chosen by measured speed and accuracy
# (docs/quantization.md). Q5_0 (most of a small Qwen's Q4_K_M file) stays in its blocks where
# the native kernel runs: it reads 5.5 bits a value. Q8_0 and Q4_0 become int8 per output row.
# The K-quants (Q4_K, Q5_K, Q6_K: most of a larger Qwen's file) stay as stored where their
# kernels were measured level with int8 or faster (`gguf_auto_formats`), else int8 (8 bits a
# value against the file's 4.5 to 6.6).
GGUF_AUTO_FORMATS = {
    T.Q8_0: INT8,
    T.Q6_K: INT8,
    T.Q5_K: INT8,
    T.Q5_0: Q5_0,  # kept as stored where the native kernel runs, else int8
    T.Q4_K: INT8,
    T.Q4_0: INT8,
}
GGUF_STORED_FORMATS = {**GGUF_AUTO_FORMATS, T.Q6_K: Q6_K, T.Q5_K: Q5_K, T.Q4_K: Q4_K}

# The kernel variants (qwenkit.kernels.cpu) under which keeping the K-quants as stored was measured
# the better choice over int8. AVX2 EPYC: per matrix Q4_K 0.53-0.97x int8's time, Q6_K 0.58-1.11x,
# and on a Qwen3-0.6B of Q4_K_M's layout (benchmarks/kquant_formats.py) prefill 1.32x as fast, one
# stream 1.06x, 8 streams 1.12x, with 26% less memory for the weights (docs/quantization.md).
# AVX-512 EPYC (Zen 5; `avx512_vnni`, bfloat16 prefill on oneDNN either way), Qwen3-0.6B / 1.7B of
# Q4_K_M's layout: one stream 1.27x / 1.34x as fast, 8 streams 1.09x / 1.15x, prefill 1.02x /
# 0.98x, 30% less memory for the weights. The AMX variant's int8 has tiles the K-quant kernels
# lack (from 16 rows), and nothing was measured there: int8 stays.
K_QUANTS_STORED_ISAS = ("avx2", "avx512_vnni")


def gguf_auto_formats() -> dict[T, str]:
    """GGUF storage type -> in-memory format under "auto" on this machine: `GGUF_AUTO_FORMATS`,
    the K-quants as stored where the selected kernel variant is one of `K_QUANTS_STORED_ISAS`."""
    if kernels.cpu.selected_isa() in K_QUANTS_STORED_ISAS:
        return GGUF_STORED_FORMATS
    return GGUF_AUTO_FORMATS


def check_quantization(quantization: str | None) -> str:
    """The quantization choice, "auto" for None; ModelLoadError naming the choices otherwise."""
    quantization = "auto" if quantization is None else quantization
    if quantization not in QUANTIZATION_CHOICES:
        raise ModelLoadError(
            f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATION_CHOICES)}"
        )
    return quantization


def plan_quantization(
    model: nn.Module,
    quantization: str | None,
    *,
    tensor_types: Mapping[str, T] | None,
    device: torch.device,
    prequantized: tuple[Prequantization, Mapping[str, tuple[str, tuple[int, ...]]]] | None = None,
) -> dict[str, str | tuple[str, ...] | StoredFormat]:
    """{module name: format} for `quantize_modules`. tensor_types: the GGUF storage type of
    each checkpoint tensor by HF name (None for a safetensors checkpoint). prequantized: what a
    pre-quantized checkpoint's config says and its tensors ({name: (dtype, shape)})."""
    quantization = check_quantization(quantization)
    if prequantized is not None:
        scheme, stored = prequantized
        if quantization != "auto":
            raise ModelLoadError(f"the checkpoint is quantized already ({scheme.format.method}) and loads as "
                                 f"stored; --quantization {quantization} does not apply to it (use auto)")
        return scheme.plan(model, stored)
    if quantization == "int4" and device.type != "cpu":
        raise ModelLoadError("quantization 'int4' runs on CPU only (torch's int4 CPU kernel); use int8 or none")
    if quantization == "gguf" and tensor_types is None:
        raise ModelLoadError("quantization 'gguf' keeps GGUF blocks as stored: it needs a .gguf checkpoint")
    from_gguf = quantization in ("auto", "gguf")
    if quantization == "none" or (from_gguf and (tensor_types is None or device.type != "cpu")):
        return {}
    modules = dict(model.named_modules())
    if not from_gguf:
        formats = {}
        for name, module in modules.items():
            if type(module) is Embedding or name == "lm_head":
                formats[name] = INT8
            elif type(module) is Linear and not name.endswith(".mlp.gate"):  # the MoE router stays float
                formats[name] = quantization if quantization == INT8 or _fits_int4(module) else INT8
        return formats

    params = dict(model.named_parameters())
    stored: dict[str, dict[object, T]] = {}  # module name -> {shard: storage type}
    experts: dict[str, dict[str, T]] = {}  # experts module name -> {"gate_proj" / "up_proj" / "down_proj": type}
    for hf_name, tensor_type in tensor_types.items():
        target = _target(model, params, hf_name)
        if target is not None and target[0].endswith(".weight"):
            stored.setdefault(target[0].removesuffix(".weight"), {})[target[1]] = tensor_type
        elif target is not None and type(modules.get(target[0].rpartition(".")[0])) is FusedExperts:
            experts.setdefault(target[0].rpartition(".")[0], {})[hf_name.rpartition(".")[2]] = tensor_type
    table = GGUF_STORED_FORMATS if quantization == "gguf" else gguf_auto_formats()
    formats: dict[str, str | tuple[str, ...]] = {}
    for name, types in stored.items():
        wanted = {table.get(t) for t in types.values()} - {None}
        module = modules.get(name)
        if not wanted:
            continue  # stored as floats
        if type(module) is Embedding:
            (tensor_type,) = types.values()
            # The lm_head needs a matmul: a tied embedding is int8, else kept as stored.
            formats[name] = INT8 if getattr(model, "lm_head", None) is None else f"{GGUF}:{tensor_type.name}"
        elif type(module) is Linear and not name.endswith(".mlp.gate"):
            formats[name] = _linear_format(module, [table.get(types.get(shard)) for shard in module.shard_index])
    for name, types in experts.items():
        if (format := _experts_format(modules[name], types)) is not None:
            formats[name] = format
    return formats


def _experts_format(experts: FusedExperts, types: Mapping[str, T]) -> tuple[str, str, str] | None:
    """The GGUF formats (gate, up, down) a sparse layer's experts keep, as stored, where each of the
    three is a K-quant the native MoE kernel takes (`kernels.MOE_BLOCKS`) and it runs here; else
    None: they load as floats."""
    names = [types.get(part) for part in ("gate_proj", "up_proj", "down_proj")]
    if None in names or not kernels.has_gguf_kernel("Q4_K"):  # stored as floats, or no native kernels here
        return None
    names = [t.name for t in names]
    hidden, intermediate = experts.gate_up_proj.shape[2], experts.intermediate_size
    block = kernels.GGUF_BLOCKS["Q4_K"][0]  # every K-quant: super-blocks of 256 values
    if not set(names) <= set(kernels.MOE_BLOCKS) or hidden % block or intermediate % block:
        return None
    return tuple(f"{GGUF}:{t}" for t in names)


def _linear_format(linear: Linear, wanted: list[str | None]) -> str | tuple[str, ...]:
    """The format of a (possibly fused) matrix whose shards want `wanted` (None: stored as floats):
    theirs where it is one and its kernel runs here; where the shards differ, a format per shard
    if each is int8 or has its kernel (`QuantLinear`'s parts), else int8 for the whole."""
    runs = [f == INT8 or (f in GGUF_LINEAR_FORMATS and _fits_kernel(linear, f, rows))
            for f, rows in zip(wanted, linear.output_sizes)]
    if set(wanted) == {INT4} and _fits_int4(linear):
        return INT4
    if len(set(wanted)) == 1:
        return wanted[0] if all(runs) else INT8
    return tuple(wanted) if all(runs) else INT8


def _fits_kernel(linear: Linear, format: str, rows: int) -> bool:
    """Whether the native kernel for GGUF-block `format` runs here on this matrix's rows (`rows`
    of them in a shard: Q5_0's layout packs them 8 at a time)."""
    type_name = format.partition(":")[2]
    return (linear.weight.shape[1] % kernels.GGUF_BLOCKS[type_name][0] == 0
            and rows % kernels.PACKED_ROWS[type_name] == 0 and kernels.has_gguf_kernel(type_name))


def _fits_int4(linear: Linear) -> bool:
    out_features, in_features = linear.weight.shape
    return in_features % INT4_GROUP_SIZE == 0 and out_features % 16 == 0
