"""The CPU thread count: the cgroup quota read from fake cgroup trees (v2 and v1), the default
under a restricted affinity mask, and `threads=N` reaching torch and the C kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwenkit.engine import threads

REPO = Path(__file__).resolve().parent.parent


def _tree(tmp_path: Path, files: dict[str, str], proc_cgroup: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(proc_cgroup)
    return root, proc


@pytest.mark.parametrize(("files", "proc_cgroup", "expected"), [
    # v2, a quota on this cgroup; its parent has none
    ({"cpu.max": "max 100000\n", "app/cpu.max": "150000 100000\n"}, "0::/app\n", 1.5),
    # v2, the tighter quota is the parent's
    ({"a/cpu.max": "50000 100000\n", "a/b/cpu.max": "300000 100000\n"}, "0::/a/b\n", 0.5),
    # v2, no quota anywhere
    ({"cpu.max": "max 100000\n", "app/cpu.max": "max 100000\n"}, "0::/app\n", None),
    # v2 inside a container: the path is the host's, the mount is the container's own cgroup
    ({"cpu.max": "200000 100000\n"}, "0::/system.slice/docker-abc.scope\n", 2.0),
    # v1, cpu and cpuacct mounted together
    ({"cpu,cpuacct/job/cpu.cfs_quota_us": "250000\n", "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n",
      "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
     "12:memory:/job\n4:cpu,cpuacct:/job\n0::/\n", 2.5),
    # v1, quota -1: none (this machine's own layout)
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "1:cpu:/\n0::/\n", None),
    # garbage in a file is no quota, not an error
    ({"cpu.max": "lots 100000\n"}, "0::/\n", None),
    # no cgroup files at all
    ({}, "0::/\n", None),
])
def test_cgroup_cpu_limit(tmp_path, files, proc_cgroup, expected):
    root, proc = _tree(tmp_path, files, proc_cgroup)
    assert threads.cgroup_cpu_limit(root, proc) == expected


def test_default_threads_takes_the_quota_rounded_down(monkeypatch):
    monkeypatch.setattr(threads, "physical_cores", lambda: 8)
    for limit, expected in ((None, 8), (1.5, 1), (0.3, 1), (2.0, 2), (64.0, 8)):
        monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda limit=limit: limit)
        assert threads.default_threads() == expected


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_set_threads_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="threads must be a whole number >= 1"):
        threads.set_threads(bad)


def _run(code: str, extra_env: dict | None = None) -> dict:
    """`code` in a fresh interpreter (OpenMP settings as a user's shell would have none); its
    last stdout line as JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**env, **(extra_env or {})}, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two CPUs")
def test_default_respects_a_restricted_affinity_mask():
    cpu = min(os.sched_getaffinity(0))
    result = _run(f"""
import json, os
os.sched_setaffinity(0, {{{cpu}}})
from qwenkit.engine import threads
print(json.dumps({{"default": threads.default_threads(), "configured": threads.configure_threads()}}))
""")
    assert result == {"default": 1, "configured": 1}


def _kernels_library():
    """The qwenkit kernel library this process loaded, opened again by its path (the same handle)."""
    import ctypes

    from qwenkit.kernels import cpu

    if cpu.library() is None:
        pytest.skip("no native kernels here (no C compiler)")
    maps = Path("/proc/self/maps").read_text().split()
    path = next(p for p in maps if "/qwenkit_" in p and p.endswith(".so"))
    return ctypes.CDLL(path)


def test_threads_reach_torch_and_the_kernels_on_every_computing_thread(tiny_checkpoint):
    import torch

    from qwenkit import LLM, AsyncLLM

    lib = _kernels_library()
    before = torch.get_num_threads()
    try:
        LLM(str(tiny_checkpoint), device="cpu", threads=1, progress=False)
        # the runner's configure_threads() kept the choice; the kernels' regions take it too
        assert torch.get_num_threads() == 1 and lib.qk_team_size() == 1
        allm = AsyncLLM(str(tiny_checkpoint), device="cpu", threads=1, progress=False)
        try:
            # AsyncLLM steps on a thread of its own, whose OpenMP setting starts as the
            # process default (the CPU count), not the main thread's
            assert allm._call(lib.qk_team_size).result(timeout=60) == 1
            assert allm._call(torch.get_num_threads).result(timeout=60) == 1
        finally:
            allm.shutdown()
    finally:
        threads._chosen = None
        torch.set_num_threads(before)


def _omp_display(code: str, extra_env: dict | None = None) -> str:
    """libgomp's settings as it prints them when it loads (OMP_DISPLAY_ENV=VERBOSE), in a fresh
    process. Its OMP_WAIT_POLICY line says PASSIVE for an unset policy too; GOMP_SPINCOUNT tells
    them apart (300000 unset, 0 passive, 3000 qwenkit's)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**env, "OMP_DISPLAY_ENV": "VERBOSE", **(extra_env or {})})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


def test_torchs_openmp_spins_briefly_once_qwenkit_is_imported():
    assert f"GOMP_SPINCOUNT = '{threads.SPIN_COUNT}'" in _omp_display("import qwenkit, torch")
    # a user's own setting stands
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in _omp_display("import qwenkit, torch", {"OMP_WAIT_POLICY": "ACTIVE"})


def test_torch_imported_first_is_said_once():
    stderr = _omp_display("import torch, qwenkit\nfrom qwenkit.engine import threads\n"
                          "threads.set_threads(2); threads.set_threads(2)")
    assert "GOMP_SPINCOUNT = '300000'" in stderr  # libgomp had loaded: the policy came too late
    assert stderr.count("torch was imported before qwenkit") == 1


def test_bench_contention_specs_and_report(monkeypatch):
    """benchmarks/bench_contention.py's engine specs and its targets' arithmetic (the runs
    themselves load the default model: `--quick` is their smoke test)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_contention as b

    spec = b.EngineSpec.parse("x", "qwenkit:threads=1,GOMP_SPINCOUNT=0")
    assert (spec.kind, spec.threads, spec.env) == ("qwenkit", 1, {"GOMP_SPINCOUNT": "0"})
    assert b.EngineSpec.parse("l", "llamacpp").threads == 2
    with pytest.raises(SystemExit, match="not qwenkit or llamacpp"):
        b.EngineSpec.parse("y", "vllm")
    results = {"qwenkit": {"threads": 2, "tok_s": {"0,1": [40.0, 50.0], "2,1": [16.0]}},
               "qwenkit threads=1": {"threads": 1, "tok_s": {"0,1": [40.0], "2,1": [20.0]}},
               "llama.cpp": {"threads": 2, "tok_s": {"0,1": [40.0], "2,1": [1.0]}}}
    s = b.summarize(results, cores=2, loads=[0, 2], streams=[1])
    busy = s["rows"][1]
    assert busy["kept"] == pytest.approx(16 / 45) and busy["kept_target"] == pytest.approx(0.4)
    assert busy["vs_threads_1"] == pytest.approx(0.8) and busy["vs_llamacpp"] == pytest.approx(16)
    line = b.report(s).splitlines()[-1]
    assert line.count("MISSED") == 2 and line.count("ok") == 1
