"""The kernels' ops, one module per kind of op, each op's implementations side by side.

An op is one function that model code calls (re-exported by `qwenkit.kernels`), which picks one
of its implementations from the tensors' device and dtype:

- `cpu`: a C kernel of `csrc/` through the ctypes bindings of `kernels.cpu` (a `Library`
  method), where the dtype and layout are ones it takes;
- `triton`: a Triton kernel of `kernels/cuda/` (on CUDA, or on the CPU under Triton's
  interpreter in the tests), imported only when it runs;
- `reference`: the torch code of `kernels.reference`, which runs everywhere else and which the
  tests hold every kernel against.

Each module's `OPS` names an op's implementations, and tests/test_kernels.py holds their
signatures equal to the op's (`Op.implementations`), so that they cannot drift apart.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qwenkit.kernels import cpu


@dataclass(frozen=True)
class Op:
    """An op and its implementations: `cpu` a `cpu.Library` method, `triton` "module:function"
    under qwenkit.kernels.cuda (not imported here: a CPU run never imports Triton)."""

    entry: Callable
    cpu: Callable | None = None
    triton: str | None = None
    reference: Callable | None = None

    def implementations(self) -> dict[str, Callable]:
        """The implementations there are, by name (imports Triton for `triton`)."""
        found = {"cpu": self.cpu, "reference": self.reference}
        if self.triton is not None:
            module, name = self.triton.split(":")
            found["triton"] = getattr(importlib.import_module(f"qwenkit.kernels.cuda.{module}"), name)
        return {k: v for k, v in found.items() if v is not None}


def native(*tensors: torch.Tensor) -> cpu.Library | None:
    """The CPU library where every tensor is float32 on the CPU, else None."""
    if all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return cpu.library()
    return None


def native_16bit(*tensors: torch.Tensor) -> cpu.Library | None:
    """The CPU library where every tensor is on the CPU in one 16-bit dtype (`cpu.HALF_DTYPES`:
    the kernels that also take those) and the library is a SIMD build, else None. The plain C
    build converts a value at a time: 3-7x slower than torch's ops at a 257-token step on one
    thread (docs/benchmarks.md#embeddings), so it leaves 16-bit rows to torch."""
    dtype = tensors[0].dtype
    if dtype in cpu.HALF_DTYPES and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors):
        lib = cpu.library()
        return lib if lib is not None and lib.isa != "generic" else None
    return None


def cache_holds(cache: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the KV cache stores x's dtype: the Triton kernels take one dtype; a cache asked in
    another (`kv_cache_dtype`) runs the torch code, which converts."""
    return cache.dtype == x.dtype
