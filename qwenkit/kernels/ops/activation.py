"""SwiGLU's activation on the fused gate_up matmul's output."""

from __future__ import annotations

import torch

from qwenkit.kernels import cpu, cuda, reference
from qwenkit.kernels.ops import Op, native, native_16bit


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: [T, 2 * I] (gate, then up) -> silu(gate) * up [T, I]."""
    if cuda.applies(x):
        from qwenkit.kernels.cuda import fused

        return fused.silu_and_mul(x)
    if not torch.compiler.is_compiling() and x.dim() == 2 and (lib := native(x) or native_16bit(x)) is not None:
        return lib.silu_and_mul(x.contiguous())
    return reference.silu_and_mul(x)


OPS = {"silu_and_mul": Op(silu_and_mul, cpu=cpu.Library.silu_and_mul, triton="fused:silu_and_mul",
                          reference=reference.silu_and_mul)}
