"""How many threads torch computes with: one per physical core this process may use.

A second hardware thread on a core adds no matmul throughput, and on a small machine any
extra busy thread costs far more than its share: every parallel op waits at a barrier
for its slowest thread, so one descheduled OpenMP worker stalls the whole step (measured
on 2 cores with other work running: 15 ms for a 2-row matmul that takes 0.6 ms on one
thread). So torch gets the physical cores and nothing else adds a thread pool: sampling
runs on the engine's thread between forward passes, the HTTP server is one asyncio
thread that mostly waits, and the Rust tokenizer's own pool (one thread per CPU) is
turned off — qwenkit encodes one prompt at a time, where it does not help.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


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


def configure_threads() -> int:
    """Set torch's intra-op threads to the physical cores, unless OMP_NUM_THREADS says
    otherwise; turn off the tokenizer's thread pool unless TOKENIZERS_PARALLELISM is set.
    Returns the number of torch threads."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "OMP_NUM_THREADS" not in os.environ:
        cores = physical_cores()
        if torch.get_num_threads() != cores:
            torch.set_num_threads(cores)
    return torch.get_num_threads()
