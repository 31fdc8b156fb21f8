"""Mixture of experts: each token through its top_k experts' SwiGLU."""

from __future__ import annotations

import torch

from qwenkit.kernels import cpu, reference
from qwenkit.kernels.batch_invariance import is_batch_invariant, linear
from qwenkit.kernels.ops import Op
from qwenkit.kernels.ops.activation import silu_and_mul


def fused_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """Each token through its top_k experts' SwiGLU, summed with the routing weights.

    x: [T, hidden]; expert_ids, weights: [T, top_k]; gate_up_proj: [E, 2 * I, hidden] (gate
    rows first); down_proj: [E, hidden, I]. Under torch.compile an opaque op: the loop over the
    experts in use depends on the routing. Off the CPU in bfloat16: grouped GEMMs, no host sync
    (`moe_syncs_with_host`)."""
    if _grouped_experts_apply(x):
        return reference.grouped_experts(x, expert_ids, weights, gate_up_proj, down_proj, silu_and_mul=silu_and_mul)
    if torch.compiler.is_compiling():
        return _fused_experts_op(x, expert_ids, weights, gate_up_proj, down_proj)
    if is_batch_invariant():
        return reference.fused_experts(x, expert_ids, weights, gate_up_proj, down_proj, linear=linear)
    return reference.fused_experts(x, expert_ids, weights, gate_up_proj, down_proj)


def _grouped_experts_apply(x: torch.Tensor) -> bool:
    """Where torch._grouped_mm runs: off the CPU, bfloat16, Hopper or newer on CUDA."""
    if x.device.type == "cpu" or x.dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    return x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) >= (9, 0)


def moe_syncs_with_host(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `fused_experts` reads the routing back to the host there (then no CUDA graph
    can hold an MoE step)."""
    return not _grouped_experts_apply(torch.empty(0, dtype=dtype, device=device))


@torch.library.custom_op("qwenkit::fused_experts", mutates_args=())
def _fused_experts_op(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    return reference.fused_experts(x, expert_ids, weights, gate_up_proj, down_proj)


@_fused_experts_op.register_fake
def _(x, expert_ids, weights, gate_up_proj, down_proj):
    return torch.empty_like(x)


def gguf_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    types: str,
) -> torch.Tensor:
    """Each token through its top_k experts' SwiGLU, the experts kept in GGUF K-quant blocks as a
    GGUF file stores them, summed with the routing weights; in x's dtype.

    x: [T, hidden]; expert_ids, weights: [T, top_k]; gate, up: uint8 [E, I, bytes per row of
    hidden]; down: uint8 [E, hidden, bytes per row of I]; types: their GGUF types, "gate,up,down".
    On CPU one native call (csrc/moe.c: only the routed experts' blocks are read, activations
    rounded to int8 per 256 values as the K-quant matmuls do); elsewhere each expert in use is
    dequantized and multiplied in x's dtype."""
    if x.device.type == "cpu" and torch.compiler.is_compiling():
        return _gguf_experts_op(x, expert_ids, weights, gate, up, down, types)
    return _gguf_experts(x, expert_ids, weights, gate, up, down, types)


def _gguf_experts(x, expert_ids, weights, gate, up, down, types):
    if x.device.type == "cpu" and (lib := cpu.library()) is not None:
        return lib.gguf_experts(x, expert_ids, weights, gate, up, down, types).to(x.dtype)
    from qwenkit.kernels.ops.linear import gguf_dequantize

    return reference.gguf_experts(x, expert_ids, weights, gate, up, down, types, dequantize=gguf_dequantize)


@torch.library.custom_op("qwenkit::gguf_experts", mutates_args=())
def _gguf_experts_op(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    types: str,
) -> torch.Tensor:
    return _gguf_experts(x, expert_ids, weights, gate, up, down, types)


@_gguf_experts_op.register_fake
def _(x, expert_ids, weights, gate, up, down, types):
    return torch.empty_like(x)


# reference.fused_experts and gguf_experts are not listed: they take the experts' matmul as a keyword too (`linear`: the
# batch-invariant one here, models/prequantized.py's stored-format experts), the second the
# dequantization as a keyword (the native one where built), which these entries pick.
OPS = {"fused_experts": Op(fused_experts), "gguf_experts": Op(gguf_experts, cpu=cpu.Library.gguf_experts)}
