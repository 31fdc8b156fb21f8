"""Small C kernels for the CPU decode step, built once with the system C compiler.

Each kernel is one C source string. `load_library` compiles it with `-O3 -march=native`
into `<qwenkit home>/kernels/<name>_<hash>.so` (the hash covers the source, the flags and
the CPU's feature flags, so a new CPU or a changed source builds anew), loads it through
ctypes and returns it; ctypes releases the GIL during the call. OpenMP loops run on
torch's own libgomp (same soname), so there is one thread pool, not two.

`QWENKIT_NATIVE_KERNELS=0` turns every kernel off (the torch paths run instead); so does a
missing compiler, with a warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]


def native_kernels_enabled() -> bool:
    return os.environ.get("QWENKIT_NATIVE_KERNELS", "1") != "0"


def build(name: str, source: str, folder: Path) -> Path:
    """Compile `source` into folder/<name>_<hash>.so unless it is there already (atomic:
    safe for several processes sharing the folder)."""
    cpu = platform.machine() + (_cpu_flags() or "")
    key = hashlib.sha256("\0".join([source, *FLAGS, cpu]).encode()).hexdigest()[:16]
    target = folder / f"{name}_{key}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("building the %s kernel with %s (once; kept in %s)", name, compiler, folder)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = Path(tmp) / f"{name}.c"
        src.write_text(source)
        out = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, str(src), "-o", str(out), "-lm"], check=True, capture_output=True)
        os.replace(out, target)
    return target


@functools.cache
def load_library(name: str, source: str) -> ctypes.CDLL | None:
    """The compiled library, or None when kernels are off or it cannot be built (then the
    caller runs its torch path)."""
    if not native_kernels_enabled():
        return None
    from qwenkit.default_model import qwenkit_home

    try:
        return ctypes.CDLL(str(build(name, source, qwenkit_home() / "kernels")))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        logger.warning("native kernel %s unavailable, using the torch path: %s %s",
                       name, e, detail.decode(errors="replace")[-500:])
        return None


def _cpu_flags() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), None)
    except OSError:
        return None
