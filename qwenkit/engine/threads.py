"""How many threads the CPU compute uses: the cores this process may run on, and no more.

torch's intra-op pool and the C kernels (`qwenkit/kernels`, compiled with -fopenmp) share one
OpenMP runtime, torch's own libgomp (same soname), so one number sets both: torch's
`set_num_threads` sets it for the calling thread, and a thread that first computes later
(`AsyncLLM`'s engine thread) takes it from torch when it calls `configure_threads()`.

The default is the physical cores in this process's affinity mask (a second hardware thread
on a core adds no matmul throughput), capped by the cgroup CPU quota (a container given
1.5 CPUs of time on a 64-core host gets 1 thread, not 64): every parallel region ends at a
barrier, so a thread that is descheduled, whether by the quota or by other programs, stalls
the whole step until it runs again (measured on 2 cores beside other work: 15 ms for a
2-row matmul that takes 0.6 ms on one thread). `OMP_NUM_THREADS`, when set, is left to
torch; `LLM(threads=N)` / `--threads N` override both.

Nothing else adds a thread pool: sampling runs on the engine's thread between forward
passes, the HTTP server is one asyncio thread that mostly waits, and the Rust tokenizer's
own pool (one thread per CPU) is turned off: qwenkit encodes one prompt at a time.

Waiting threads spin briefly, then sleep (`default_wait_policy`): this module imports no
torch at import time, so qwenkit's `__init__` can set that before torch loads libgomp.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")

# The count `set_threads` chose (None: not chosen yet): the runner's `configure_threads()`
# keeps it rather than resetting an `LLM(threads=N)` to the default.
_chosen: int | None = None
# torch (so libgomp) was loaded before `default_wait_policy()` could set the policy: its
# workers spin; said once, when more than one thread is chosen.
_wait_policy_missed = False


# libgomp's spins before a waiting worker sleeps (GOMP_SPINCOUNT; ~20 ns each here): ~60 us,
# enough to span the gaps between one decode step's ~150 parallel regions, short enough to give
# the core back when the thread it waits for has been descheduled. 2-core AVX-512 EPYC, default
# model, tok/s at 1 / 8 streams, idle and beside 2 busy processes (docs/decode.md#threads):
# libgomp's default (300000) 45-47 idle, 11.7-11.9 busy; 3000 47-51 / 170, 20-24 / 71;
# passive (0) 27-33 / 104-127 idle, every region paying two wake-ups.
SPIN_COUNT = 3000


def default_wait_policy() -> None:
    """OpenMP workers that spin briefly, then sleep (GOMP_SPINCOUNT=SPIN_COUNT), unless
    OMP_WAIT_POLICY or GOMP_SPINCOUNT is set. libgomp's default spins ~6 ms: on a machine where
    other programs run, a spinning worker holds a core the descheduled thread it waits for
    needs, while a sleeping one gives it back and, woken, is run at once (the scheduler favours
    a thread that slept). qwenkit's `__init__` calls this, because libgomp reads the variable
    once, when torch loads it; in a program that imported torch first, it is too late
    (`set_threads` says so)."""
    global _wait_policy_missed
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    _wait_policy_missed = "torch" in sys.modules
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)  # for libgomp if it loads later, and child processes


def physical_cores() -> int:
    """Cores in this process's CPU affinity mask, counting SMT siblings once."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_limit(folder: Path) -> float | None:
    """cpu.max of a cgroup v2 folder: "max 100000" (no limit) or "150000 100000" (1.5 CPUs)."""
    text = _read(folder / "cpu.max")
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max":
        return None
    try:
        q, p = int(quota), int(period or 100000)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _v1_limit(folder: Path) -> float | None:
    """cpu.cfs_quota_us / cpu.cfs_period_us of a cgroup v1 cpu folder (quota -1: no limit)."""
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        q, p = int(quota or "-1"), int(period or "0")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _ancestors(root: Path, cgroup_path: str) -> list[Path]:
    """root/cgroup_path and each folder above it up to root (a quota anywhere up the tree
    limits this process), the ones that exist. Inside a container the path is often the
    host's and the mount is the container's own cgroup: then root alone is there."""
    parts = [p for p in cgroup_path.strip("/").split("/") if p]
    folders = [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [f for f in folders if f.is_dir()]


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPUs' worth of time this process's cgroup quota allows (1.5 for a quota of 150 ms
    per 100 ms), the tightest over the cgroup and its ancestors, cgroup v2 or v1; None when
    there is no quota or no cgroup file to read."""
    limits = []
    for line in (_read(proc_cgroup) or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2: one unified tree
            limits += [_v2_limit(f) for f in _ancestors(root, path)]
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own tree
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if mount.is_dir():
                    limits += [_v1_limit(f) for f in _ancestors(mount, path)]
                    break
    limits = [limit for limit in limits if limit is not None]
    return min(limits) if limits else None


def default_threads() -> int:
    """The physical cores this process may run on, capped by its cgroup CPU quota (rounded
    down, at least 1: a thread the quota cannot keep running stalls every barrier)."""
    cores = physical_cores()
    limit = cgroup_cpu_limit()
    return cores if limit is None else max(1, min(cores, math.floor(limit)))


def set_threads(threads: int | None = None) -> int:
    """Choose the CPU threads of torch and the C kernels: `threads`, else OMP_NUM_THREADS when
    set (torch read it), else `default_threads()`; applied to the calling thread now and to any
    thread that calls `configure_threads()`. Returns the count."""
    global _chosen, _wait_policy_missed
    import torch

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a whole number >= 1, not {threads!r}")
    if threads is None:
        threads = torch.get_num_threads() if "OMP_NUM_THREADS" in os.environ else default_threads()
    _chosen = threads
    torch.set_num_threads(threads)
    if _wait_policy_missed and threads > 1:
        _wait_policy_missed = False
        logger.warning("torch was imported before qwenkit, so its OpenMP threads spin for ~6 ms whenever they "
                       "wait, which slows qwenkit down several times over when other programs use the cores: "
                       "set GOMP_SPINCOUNT=%d before Python starts, or import qwenkit first "
                       "(docs/decode.md#threads)", SPIN_COUNT)
    return threads


def configure_threads() -> int:
    """Apply the chosen thread count (`set_threads`; its default if none was chosen) to the
    calling thread, which torch and the kernels' OpenMP regions then use; turn off the
    tokenizer's thread pool unless TOKENIZERS_PARALLELISM is set. Returns the count."""
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if _chosen is None:
        return set_threads()
    if torch.get_num_threads() != _chosen:
        torch.set_num_threads(_chosen)
    return _chosen
