"""Compiles the C kernels of csrc/ into one shared library per CPU instruction-set variant.

`build(isa)` compiles every csrc/*.c with the system C compiler (`$CC`, else gcc, else cc) and
the flags of `ISA_FLAGS[isa]` into `paths.kernels_dir()/qwenkit_<isa>_<hash>.so`, unless it
is there already: the hash covers the sources and headers, the flags, the compiler and the CPU's
feature flags, so a changed source, compiler or CPU builds anew and several processes can share
the folder (the library is written under a temporary name and renamed into place). A build
takes ~4 s of CPU once, and says so in one line on stderr (`progress`: the first use in a
process); a library already built prints nothing. OpenMP loops run on torch's own libgomp (same
soname), so there is one thread pool, not two.

Every variant builds on any x86-64 gcc or clang (the intrinsics need only the -m flags), so a
CPU without AVX-512 still compiles the AVX-512 and AMX variants: the tests do, to keep them
compiling; only a CPU that has the instructions runs them (`cpu.py` picks the variant).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qwenkit import paths

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# -ffast-math's parts, not the flag: with -ffast-math (or -funsafe-math-optimizations) on the
# link line, gcc links crtfastmath.o, whose constructor sets the CPU's flush-to-zero bits for the
# whole process when the library loads; Python then reads 5e-324 as 0.0 (found by schemathesis
# through the server's JSON parsing). And no -fassociative-math: float sums are not reordered, so
# the kernels' operations for one row are the same whatever the batch and inlining context (rows
# do not depend on the batch; with reassociation the K-quant kernel's did).
FLAGS = ["-O3", "-fno-math-errno", "-fno-signed-zeros", "-fno-trapping-math", "-freciprocal-math",
         "-ffinite-math-only", "-fno-rounding-math", "-fcx-limited-range", "-fexcess-precision=fast",
         "-fopenmp", "-shared", "-fPIC", "-Wall", "-Wextra"]
# -ffinite-math-only lets gcc assume no value is ever infinite, so a test against -INFINITY may be
# folded away: a source that uses infinities is compiled without it. attention.c starts a
# softmax's running maximum at -INFINITY and masks keys with it. The others keep it: it is what
# lets gcc vectorize quantize_row_q8's fmaxf loop (148 instructions against 77 scalar ones), which
# every int8 matmul runs on its activations.
INFINITE_MATH_SOURCES = frozenset({"attention.c"})
# Widest first. x86-64-v3 is AVX2 + FMA + F16C + BMI2; x86-64-v4 adds AVX-512 F/BW/CD/DQ/VL.
ISA_FLAGS = {
    "amx": ["-march=x86-64-v4", "-mavx512vnni", "-mamx-tile", "-mamx-int8", "-mtune=native"],
    "avx512_vnni": ["-march=x86-64-v4", "-mavx512vnni", "-mtune=native"],
    "avx2": ["-march=x86-64-v3", "-mtune=native"],
    "generic": ["-DQK_NO_SIMD"],  # plain C: any CPU, and the reference the SIMD code is tested against
}
# Tests only: the AVX-512 and AMX code paths built for an AVX2 CPU, their intrinsics emulated
# (SIMDe's portable AVX-512, Debian's libsimde-dev; csrc/emulate_amx.h), so that their logic runs
# against the reference on a CPU without the instructions. Slow; never loaded for inference.
EMULATED_ISA_FLAGS = {
    "amx": [*ISA_FLAGS["avx2"], "-DQK_EMULATE_AVX512", "-DQK_EMULATE_AMX", "-Wno-psabi"],
    "avx512_vnni": [*ISA_FLAGS["avx2"], "-DQK_EMULATE_AVX512", "-Wno-psabi"],
}


class BuildError(RuntimeError):
    """The kernels could not be compiled here (no compiler, or it rejected the flags)."""


def compiler() -> str:
    found = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if found is None:
        raise BuildError("no C compiler (gcc or cc) on PATH")
    return found


def sources(csrc: Path = CSRC) -> list[Path]:
    return sorted(csrc.glob("*.c"))


def source_flags(source: Path, flags: list[str]) -> list[str]:
    """The compiler flags of one source: `flags`, less -ffinite-math-only for a source of
    `INFINITE_MATH_SOURCES`."""
    if source.name in INFINITE_MATH_SOURCES:
        return [f for f in flags if f != "-ffinite-math-only"]
    return flags


def build(isa: str, folder: Path | None = None, *, extra_flags: tuple[str, ...] = (), emulated: bool = False,
          csrc: Path = CSRC, progress: bool = False) -> Path:
    """The path of the `isa` library, compiled into `folder` (default: `paths.kernels_dir()`)
    unless it is there already. `extra_flags`: more compiler flags (tests: -Werror);
    `emulated`: the `EMULATED_ISA_FLAGS` build of `isa` (tests); `csrc`: another version of the
    sources (benchmarks/ab_kernel_sources.py; the hash keeps its library apart); `progress`: a
    line on stderr while it compiles (nothing when the library is there)."""
    if folder is None:
        folder = paths.kernels_dir()
    cc = compiler()
    flags = [*FLAGS, *(EMULATED_ISA_FLAGS if emulated else ISA_FLAGS)[isa], *extra_flags]
    digest = hashlib.sha256()
    for path in sorted(csrc.iterdir()):
        if path.suffix in (".c", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update("\0".join([*flags, *sorted(INFINITE_MATH_SOURCES), cc, platform.machine(), _cpu_flags()]).encode())
    target = folder / f"qwenkit_{isa}{'_emulated' if emulated else ''}_{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("building the %s CPU kernels with %s (once; kept in %s)", isa, cc, folder)
    if progress:
        print(f"qwenkit: compiling the CPU kernels ({isa}, once) ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        _compile(cc, flags, csrc, target)
    except BuildError:
        if progress:
            print(" failed", file=sys.stderr, flush=True)
        raise
    if progress:
        print(f" done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return target


def _compile(cc: str, flags: list[str], csrc: Path, target: Path) -> None:
    """Each source to an object with its flags (`source_flags`), linked into `target`."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = [Path(tmp) / f"{source.stem}.o" for source in sources(csrc)]
        commands = [[cc, *source_flags(source, flags), "-c", str(source), "-I", str(csrc), "-o", str(obj)]
                    for source, obj in zip(sources(csrc), objects)]
        out = Path(tmp) / target.name
        commands.append([cc, *flags, *map(str, objects), "-o", str(out), "-lm"])
        for command in commands:
            try:
                subprocess.run(command, check=True, capture_output=True, text=True)
            except subprocess.CalledProcessError as e:
                raise BuildError(f"{' '.join(command)} failed:\n{e.stderr[-2000:]}") from None
            except OSError as e:
                raise BuildError(f"cannot run {cc}: {e}") from None
        os.replace(out, target)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""
