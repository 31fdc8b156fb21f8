"""How the model-taking commands (`run`, `chat`, `bench`, `serve`, `embed`) find and load the
model their options name: shared by `qwenkit.cli` and `qwenkit.chat_cli`, so neither imports
the other. Torch-free at import; the engine is imported only once the files are found."""

from __future__ import annotations

import argparse
import os
import sys
import time

from qwenkit.errors import QwenkitError


def say(text: str) -> None:
    """A plain status line on stderr (where logs go, never mixed into an answer on stdout)."""
    print(f"qwenkit: {text}", file=sys.stderr, flush=True)


def llm_kwargs(args: argparse.Namespace) -> dict:
    """The `LLM` arguments the model options give (not the model itself)."""
    return dict(dtype=args.dtype, device=args.device, kv_cache_memory=args.kv_cache_memory,
                kv_cache_dtype=args.kv_cache_dtype,
                max_model_len=args.max_model_len, quantization=args.quantization, compile=args.compile,
                enforce_eager=args.enforce_eager, deterministic=args.deterministic,
                speculative=args.speculative,
                tensor_parallel_size=args.tensor_parallel_size,
                enable_expert_parallel=args.enable_expert_parallel,
                **({"threads": args.threads} if args.threads is not None else {}))


def model_files(args: argparse.Namespace):
    """The files `args.model` names, found (downloaded, or the default model assembled) before
    the engine is imported: a wrong path is an error at once."""
    from qwenkit.model_files import resolve_model

    # The default model's first assembly says so off a terminal too; downloads show bars on one.
    return resolve_model(args.model, progress=sys.stderr.isatty() or args.model == "default")


def load_llm(args: argparse.Namespace, files=None, *, engine: str = "LLM", **engine_kwargs):
    """The model `args` names (its `files` when already found), as an `LLM` or
    (engine="AsyncLLM") an `AsyncLLM`.

    On a terminal, loading shows progress bars; elsewhere it prints a plain line when loading
    starts and one when the model is ready (logs stay readable, and never silent).
    """
    if getattr(args, "speculative", None):  # a wrong value is an error before anything loads
        from qwenkit.engine.speculative import SpeculativeConfig

        SpeculativeConfig.parse(args.speculative)
    files = files or model_files(args)
    check_memory(args, files, max_num_seqs=engine_kwargs.get("max_num_seqs"))
    if engine == "AsyncLLM":
        from qwenkit.async_llm import AsyncLLM as cls
    else:
        from qwenkit.llm import LLM as cls
    tty = sys.stderr.isatty()
    if not tty:
        say(f"loading model {args.model} (the first load of a model takes longest)")
    begun = time.perf_counter()
    llm = cls(str(files.path), progress=tty, **llm_kwargs(args), **engine_kwargs)
    if not tty:
        inner = getattr(llm, "llm", llm)
        say(f"loaded {inner.model_name} in {time.perf_counter() - begun:.1f} s")
    return llm


def check_memory(args: argparse.Namespace, files, *, max_num_seqs: int | None = None) -> None:
    """Refuse, in one line, a model whose weights, KV cache and activations will not fit the
    device (qwenkit/memory_plan.py), before anything is loaded; --no-memory-check or
    QWENKIT_NO_MEMORY_CHECK=1 skips it. Not planned: --quantization int8 / int4 (the
    weights are requantized as they load) and none (GGUF blocks dequantized)."""
    from qwenkit import memory_plan as mp

    if getattr(args, "no_memory_check", False) or os.environ.get(mp.NO_CHECK_ENV, "") not in ("", "0"):
        return
    if getattr(args, "quantization", "auto") not in ("auto", "gguf"):
        return
    from qwenkit.llm import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    try:
        plan = mp.plan_files(files, device=str(device) if cuda else "cpu", dtype=args.dtype,
                             kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory=mp.parse_memory(args.kv_cache_memory),
                             max_model_len=args.max_model_len, max_num_seqs=max_num_seqs,
                             tensor_parallel_size=args.tensor_parallel_size if cuda else 1)  # CPU ranks share the RAM
    except (QwenkitError, OSError, ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError):
        return  # files the plan cannot read: the loader says what is wrong with them, in its own words
    name = None if args.model == "default" else args.model
    try:
        available = mp.available_memory(str(device) if cuda else "cpu")
    except (RuntimeError, AssertionError, OSError):  # a CUDA that cannot say: the engine finds out
        return
    mp.check_fits(files, plan, available, name=name)
