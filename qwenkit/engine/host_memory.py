"""Freed host memory goes back to the operating system (glibc's malloc; a no-op elsewhere).

glibc's malloc serves a request of 128 KiB or more with a memory map of its own and unmaps
it on free, but the first time it frees such a buffer it raises that threshold to the
buffer's size (up to 32 MiB): from then on buffers of that size come from the heap, and the
heap keeps what is freed in its middle resident. A CPU prefill step allocates buffers of
many such sizes (at 1,024 tokens of the default model: 4 MiB hidden states, 19 and 38 MiB
for the MLP's products), so after the first long prompt the process stays larger for good:
measured on the default model (2-core AVX2 EPYC), peak RSS 891 MiB after one 1,024-token
prefill against 801 MiB with the threshold fixed, and 731 MiB once `malloc_trim` gave the
heap's free pages back. A fixed threshold turns the adjustment off, so buffers of 1 MiB and
more are always mapped and unmapped. Decode speed measured the same with it (1 and 8
streams, alternating in one process): its buffers are smaller, or few per step. The engine
sets it once the weights are loaded: loading with it took ~1 s longer (the loader's 4 MiB
row blocks faulted in afresh each time) for the same peak, as the loader trims the heap
after every tensor anyway.

`MALLOC_MMAP_THRESHOLD_` in the environment (glibc's own variable) takes precedence.

`return_freed_memory` (`malloc_trim`) gives back the heap's free pages at once: the loader
calls it after each tensor.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

M_MMAP_THRESHOLD = -3  # <malloc.h>
LARGE_BUFFER_BYTES = 1 << 20

_configured = False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """This process's C library, where it is glibc (`mallopt`, `malloc_trim`)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def return_large_buffers() -> bool:
    """Fix glibc's mmap threshold at `LARGE_BUFFER_BYTES` for this process, once. False
    where it does not apply: not glibc, or the environment already sets the threshold."""
    global _configured
    if _configured:
        return True
    libc = _glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    _configured = libc.mallopt(M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES) == 1
    return _configured


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system now (`malloc_trim`); a no-op without glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
