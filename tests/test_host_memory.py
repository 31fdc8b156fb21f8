"""Large freed buffers leave the process (qwenkit/engine/host_memory.py).

Each case runs in a fresh interpreter: the malloc setting is process-wide and one-way. The
control (glibc's default, adjusting threshold) shows the retention the setting removes, so
the test fails if the setting stops taking effect.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# After freeing a 24 MiB buffer once (which raises glibc's dynamic threshold), allocate,
# touch and free one of 20 MiB, then one of 4 MiB (so the first is not at the heap's top):
# the resident growth is what the freed 20 MiB left behind.
PROBE = """
import sys, torch
from qwenkit.engine.host_memory import return_large_buffers
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
if sys.argv[1] == "set":
    assert return_large_buffers()
torch.ones(6 << 20).sum()
before = rss_mib()
a = torch.ones(5 << 20)
b = torch.ones(1 << 20)
del a
print(rss_mib() - before)
"""


def _retained_mib(mode: str) -> float:
    env_free = {"PATH": "/usr/bin:/bin"}  # no MALLOC_* variables from the caller
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env_free,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_freed_activations_are_returned():
    assert _retained_mib("set") < 8  # the 4 MiB buffer still held
    assert _retained_mib("default") > 18  # control: glibc kept the freed 20 MiB


def test_the_environment_takes_precedence(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    from qwenkit.engine import host_memory

    monkeypatch.setattr(host_memory, "_configured", False)
    assert host_memory.return_large_buffers() is False
