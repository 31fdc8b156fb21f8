"""One model replica over N processes: this process is rank 0 (the engine: scheduler, block
manager, sampler, API) and holds a shard; ranks 1..N-1 are worker processes started here,
each holding its shard and its KV heads.

A worker is a fresh interpreter (`python -c`, its arguments pickled on its standard input)
that imports qwenkit and nothing of the user's: multiprocessing's spawn re-imports the
parent's `__main__`, so a plain script without `if __name__ == "__main__":` ran again in
every rank and failed with multiprocessing's bootstrapping error; fork cannot follow a
process that has touched CUDA. This way works from a plain script, a notebook or a server,
on CPU and CUDA alike. The worker's standard input stays open while rank 0 lives: its end
of file (rank 0 gone, however it went) ends the worker.

Every step, rank 0 broadcasts the step as plain data (`StepInput`, pickled on a gloo
group) and every rank runs it; the collectives inside the layers (all-reduce after the
row-parallel matmuls, all-gather of the vocabulary-parallel logits) keep them in lock
step, and rank 0 samples from the gathered logits. NCCL carries the collectives on CUDA,
gloo on CPU.

A worker that dies fails the step in flight and every later one with `EngineDeadError`
naming the rank and its exit code (a monitor thread watches the processes; gloo raises at
once when a peer's connection drops), and `shutdown()` stops the rest: nothing hangs and
no process is left behind. Workers exit by themselves when rank 0 goes away.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from qwenkit.distributed.parallel import ParallelConfig, TensorParallel
from qwenkit.engine.model_runner import ModelRunner, StepInput
from qwenkit.errors import QwenkitError

logger = logging.getLogger(__name__)

_TIMEOUT = timedelta(minutes=10)  # loading a shard of a large model can take minutes


class EngineDeadError(QwenkitError):
    """A rank of the model's tensor-parallel group is gone; the replica cannot run."""


@dataclass(frozen=True)
class _RunnerSizes:
    num_blocks: int
    block_size: int
    compile: bool
    enforce_eager: bool
    deterministic: bool
    max_model_len: int | None
    max_num_seqs: int
    kv_dtype: torch.dtype | None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", (device.index or 0) + rank) if device.type == "cuda" else device


def _threads_per_rank(world: int) -> int:
    from qwenkit.engine.threads import default_threads

    return max(1, default_threads() // world)


class TensorParallelExecutor:
    """Starts the worker ranks and joins the process group as rank 0. `tp` is this rank's
    place, for building its shard; `make_runner` is the engine's runner factory. `load_model`:
    how a worker loads its shard (`qwenkit.loader.load_model`), passed in so that this package
    never imports the loader, which imports it to shard a model."""

    def __init__(self, files, *, dtype: torch.dtype, device: torch.device, parallel: ParallelConfig,
                 load_model: Callable[..., Any]):
        world = parallel.tensor_parallel_size
        if dist.is_initialized():
            raise QwenkitError("this process already belongs to a torch.distributed group: one tensor-parallel "
                               "model per process (shut the other down first)")
        if device.type == "cuda" and torch.cuda.device_count() < (device.index or 0) + world:
            raise QwenkitError(f"tensor_parallel_size {world} needs {world} CUDA devices from {device}, "
                               f"but {torch.cuda.device_count()} are visible")
        self.world = world
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        port = _free_port()
        threads = _threads_per_rank(world)
        self.workers = [
            _start_worker(rank, threads, (rank, world, port, self.backend, files, dtype, rank_device(device, rank),
                                          parallel, threads, load_model))
            for rank in range(1, world)
        ]
        if device.type == "cpu":  # the ranks share the cores (configure_threads reads this)
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        self.failure: str | None = None
        self._stopped = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="qwenkit-tp-monitor", daemon=True)
        self._monitor.start()
        try:
            dist.init_process_group(self.backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=world,
                                    timeout=_TIMEOUT)
        except Exception as e:
            self.shutdown()
            raise EngineDeadError(self.failure or f"the tensor-parallel group did not form: {e}") from e
        # Step messages are Python objects: they travel on gloo whatever carries the tensors.
        self.control = dist.new_group(backend="gloo") if self.backend == "nccl" else dist.group.WORLD
        self.tp = TensorParallel(0, world, dist.group.WORLD, expert_parallel=parallel.enable_expert_parallel)
        atexit.register(self.shutdown)  # before multiprocessing's own exit handler terminates the workers

    def _watch(self) -> None:
        while not self._stopped.wait(0.2):
            for rank, w in enumerate(self.workers, start=1):
                if w.poll() is not None and self.failure is None:
                    self.failure = f"tensor-parallel rank {rank} exited with code {w.returncode}"
                    logger.error("%s; the model replica stops", self.failure)

    def check(self) -> None:
        if self.failure is not None:
            raise EngineDeadError(self.failure)

    def broadcast(self, message) -> None:
        """Send a message to every worker (None: stop)."""
        self.check()
        try:
            dist.broadcast_object_list([message], src=0, group=self.control)
        except Exception as e:
            raise self._dead(e) from e

    def _dead(self, error: Exception) -> EngineDeadError:
        for w in self.workers:
            _wait(w, 2)  # let the monitor see which rank went
        self._watch_once()
        self.failure = self.failure or f"a tensor-parallel collective failed: {error}"
        return EngineDeadError(self.failure)

    def _watch_once(self) -> None:
        for rank, w in enumerate(self.workers, start=1):
            if w.poll() is not None and self.failure is None:
                self.failure = f"tensor-parallel rank {rank} exited with code {w.returncode}"

    def make_runner(self, model, **sizes) -> "DriverRunner":
        """The engine's ModelRunner on rank 0; each worker builds its own with the same sizes."""
        keys = _RunnerSizes.__dataclass_fields__
        self.broadcast(_RunnerSizes(**{k: sizes[k] for k in keys}))
        return DriverRunner(self, model, **sizes)

    def shutdown(self) -> None:
        """Stop the workers (gracefully if the group still works) and leave the group."""
        if self._stopped.is_set():
            return
        atexit.unregister(self.shutdown)
        if self.failure is None and dist.is_initialized():
            try:
                dist.broadcast_object_list([None], src=0, group=self.control)
            except Exception:
                pass
        self._stopped.set()
        for w in self.workers:
            if not _wait(w, 10):
                w.kill()
                _wait(w, 5)
            w.stdin.close()
        if dist.is_initialized():
            dist.destroy_process_group()


class DriverRunner(ModelRunner):
    """Rank 0's runner: each step goes to the workers first, then runs here."""

    def __init__(self, executor: TensorParallelExecutor, model, **sizes):
        super().__init__(model, **sizes)
        self.executor = executor

    def execute(self, step: StepInput, *, pooling: bool = False):
        self.executor.broadcast((step, pooling))  # pooling ends the step without the lm_head's all-gather
        try:
            return super().execute(step, pooling=pooling)
        except RuntimeError as e:  # a collective whose peer is gone
            raise self.executor._dead(e) from e


def _start_worker(rank: int, threads: int, args: tuple) -> subprocess.Popen:
    """Rank `rank` in a fresh interpreter, running `_worker_main(*args)`."""
    env = dict(os.environ)
    # qwenkit from where this process has it (a source checkout on sys.path works too).
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = str(threads)  # CPU ranks share the cores; set before the worker's torch starts
    worker = subprocess.Popen(
        [sys.executable, "-c", "from qwenkit.distributed.executor import _worker_entry; _worker_entry()",
         f"qwenkit-tp-rank{rank}"],
        stdin=subprocess.PIPE, env=env,
    )
    pickle.dump(args, worker.stdin)
    worker.stdin.flush()
    return worker


def _wait(worker: subprocess.Popen, timeout: float) -> bool:
    """Whether the worker has exited within `timeout` seconds."""
    try:
        worker.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _worker_entry() -> None:
    """A worker process's main: `_worker_main` with the arguments read from standard input;
    the process ends when standard input does (rank 0 closed it, or is gone)."""
    args = pickle.load(sys.stdin.buffer)  # all rank 0 writes

    def exit_when_rank_0_goes() -> None:
        # The file descriptor, not sys.stdin: a thread blocked holding the buffered reader's
        # lock would abort the interpreter's own exit.
        while os.read(0, 4096):
            pass
        os._exit(0)

    threading.Thread(target=exit_when_rank_0_goes, name="qwenkit-tp-parent", daemon=True).start()
    _worker_main(*args)


def _worker_main(rank, world, port, backend, files, dtype, device, parallel, threads, load_model) -> None:
    """A worker rank: load this rank's shard, then run the steps rank 0 broadcasts."""
    if device.type == "cpu":
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    else:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=_TIMEOUT)
    control = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    tp = TensorParallel(rank, world, dist.group.WORLD, expert_parallel=parallel.enable_expert_parallel)
    loaded = load_model(files, dtype=dtype, device=device, quantization="none", progress=False, tp=tp)

    def receive():
        message = [None]
        dist.broadcast_object_list(message, src=0, group=control)
        return message[0]

    try:
        sizes = receive()
        if sizes is None:
            return
        runner = ModelRunner(loaded.model, device=device, progress=False, **vars(sizes))
        while (message := receive()) is not None:
            step, pooling = message
            runner.execute(step, pooling=pooling)
    except Exception as e:  # rank 0 is gone or failed: nothing left to serve
        if os.environ.get("QWENKIT_DEBUG"):
            raise
        logger.info("tensor-parallel rank %d stops: %s", rank, e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
