"""Triton kernels for CUDA: attention over the paged KV cache, fused norms and activations.

The submodules import Triton, which ships with torch's CUDA wheels; this module does not,
so the CPU path never imports it. `applies(tensor)` says whether the Triton kernels run
for a tensor: on CUDA when Triton is installed; on the CPU only when `RUN_ON_CPU` is set
(env `QWENKIT_TRITON_ON_CPU=1`) under Triton's interpreter (`TRITON_INTERPRET=1`), which is
how the test suite runs the whole CUDA path, kernels and all, on a machine without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

logger = logging.getLogger(__name__)

RUN_ON_CPU = os.environ.get("QWENKIT_TRITON_ON_CPU") == "1"


@functools.cache
def triton_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        logger.warning("Triton is not installed: CUDA runs torch's kernels, several times slower")
        return False
    return True


def enabled(device: torch.device) -> bool:
    """Whether the Triton kernels run on `device`."""
    if device.type == "cuda":
        return triton_available()
    return RUN_ON_CPU and device.type == "cpu" and triton_available()


def applies(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run for tensors like `t`."""
    return (t.is_cuda or RUN_ON_CPU) and enabled(t.device)
