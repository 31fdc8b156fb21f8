"""RMSNorm, alone and with the residual add of the previous sub-layer fused in front."""

from __future__ import annotations

import torch

from qwenkit.kernels import cpu, cuda, reference
from qwenkit.kernels.ops import Op, native, native_16bit


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, in float32, cast back before the weight (as transformers)."""
    if cuda.applies(x):
        from qwenkit.kernels.cuda import fused

        return fused.rms_norm(x, weight, eps)
    if (not torch.compiler.is_compiling() and weight.is_contiguous()
            and (lib := native(x, weight) or native_16bit(x, weight)) is not None):
        if x.dim() == 2 and x.stride(1) == 1:
            return lib.rms_norm(x, weight, eps)
        # Qwen3's per-head norms ([T, heads, D]): as rows of D, the numbers the fused decode step gets.
        return lib.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).view(x.shape)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual): a sub-layer's residual add fused into the next
    norm; the sum is rounded to the dtype first, as `residual + x` then the norm does."""
    if cuda.applies(x):
        from qwenkit.kernels.cuda import fused

        return fused.add_rms_norm(x, residual, weight, eps)
    if (not torch.compiler.is_compiling() and x.dim() == 2 and x.shape == residual.shape and x.is_contiguous()
            and residual.is_contiguous() and weight.is_contiguous()
            and (lib := native_16bit(x, residual, weight)) is not None):
        return lib.add_rms_norm(x, residual, weight, eps)  # one pass over the rows
    summed = x + residual  # the add in torch, the norm by `rms_norm`'s pick (C on a float32 CPU)
    return rms_norm(summed, weight, eps), summed


OPS = {
    "rms_norm": Op(rms_norm, cpu=cpu.Library.rms_norm, triton="fused:rms_norm", reference=reference.rms_norm),
    "add_rms_norm": Op(add_rms_norm, cpu=cpu.Library.add_rms_norm, triton="fused:add_rms_norm",
                       reference=reference.add_rms_norm),
}
