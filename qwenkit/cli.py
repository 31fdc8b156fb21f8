"""The `qwenkit` command line.

Commands that only read files (`--help`, `--version`, `list`, `show`, `rm`, `pull`) and every
argument error answer without importing torch or the engine: each command imports what it
needs when it runs, and the model-taking commands find the model's files (a wrong path is
reported) before the engine is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from qwenkit import sampling_fields
from qwenkit.cli_loading import llm_kwargs as _llm_kwargs
from qwenkit.cli_loading import load_llm, model_files
from qwenkit.cli_loading import say as _say
from qwenkit.errors import QwenkitError

RUN_MAX_TOKENS = 4096  # run answers one prompt; chat's answers may take the rest of the context


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="qwenkit: %(message)s")
    try:
        if getattr(args, "threads", None) is not None and args.threads < 1:
            raise QwenkitError(f"--threads must be >= 1, got {args.threads}")
        sampling_fields.check_arguments(args)
        return args.func(args)
    except (QwenkitError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a file the command was given or writes: never a traceback
        where = f": {str(e.filename)[:200]}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenkit", description="Run Qwen-family models locally.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer one prompt with the chat template and exit")
    _model_args(run)
    run.add_argument("prompt", nargs="?", help="the user message ('-': read standard input; absent: standard "
                     "input, or on a terminal the interactive chat)")
    run.add_argument("--system", help="a system prompt")
    run.add_argument("--image", action="append", metavar="FILE", default=[],
                     help="an image for a vision-language model (Qwen2.5-VL) to read; repeat for several")
    run.add_argument("--no-think", action="store_true", help="answer without thinking (Qwen3 enable_thinking=False)")
    sampling_fields.add_arguments(run, defaults={"max_tokens": RUN_MAX_TOKENS})
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    run.set_defaults(func=_run)

    chat = sub.add_parser("chat", help="chat in the terminal, with memory, thinking and tools")
    _model_args(chat)
    chat.add_argument("--base-url", help="an OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) instead of "
                      "the local model; --model is then the served model name (default: the endpoint's first)")
    chat.add_argument("--api-key", help="the endpoint's key (default: QWENKIT_API_KEY, else OPENAI_API_KEY)")
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--no-think", action="store_true", help="start with thinking off (/think turns it on)")
    sampling_fields.add_arguments(chat)  # per answer; /budget N changes the thinking budget
    chat.add_argument("--resume", metavar="ID", help="continue a stored conversation")
    chat.add_argument("--db", help="the conversations' SQLite file (default: chat.sqlite3 in the qwenkit home)")
    chat.add_argument("--max-history", type=int, default=40, help="past messages sent with each turn (default 40)")
    chat.add_argument("--mcp", metavar="CONFIG_JSON", help='MCP servers ({"mcpServers": {...}}) whose tools the '
                      "model may call")
    chat.add_argument("--docs", metavar="FOLDER", help="answer from the text, Markdown and PDF files of FOLDER "
                      "(indexed in memory for keyword search; the sources used are printed after each answer)")
    chat.set_defaults(func=_chat)

    embed = sub.add_parser("embed", help="embeddings of texts with an embedding model (Qwen3-Embedding), "
                           "one JSON line each")
    _model_args(embed)
    embed.add_argument("texts", nargs="*", help="the texts (none: one a line on standard input)")
    embed.add_argument("--query", action="store_true",
                       help="embed the texts as search queries, under Qwen3-Embedding's default query instruction")
    embed.add_argument("--instruction", metavar="TEXT", help="embed the texts as queries of this task")
    embed.add_argument("--dimensions", type=int, help="keep the first N values of each embedding (renormalised)")
    embed.set_defaults(func=_embed)

    bench = sub.add_parser("bench", help="measure prefill / decode speed, time to first token and memory")
    _model_args(bench)
    bench.add_argument("--prompt-tokens", type=int,
                       help="prompt length for prefill and TTFT (default 512; with --embed 256)")
    bench.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per stream")
    bench.add_argument("--concurrency", default="1,4,8,16", help="comma-separated stream counts (default 1,4,8,16)")
    bench.add_argument("--repeats", type=int, default=3,
                       help="runs of each measurement; the median is reported with min and max (default 3)")
    bench.add_argument("--json", action="store_true", help="print the results as JSON (every run's value)")
    bench.add_argument("--embed", action="store_true", help="measure embeddings/s of --prompt-tokens-token texts "
                       "(an embedding model; default 256 tokens) instead of generation")
    bench.add_argument("--image", action="store_true", help="time to first token of a turn with one image "
                       "(a vision-language model), beside transformers' on the same checkpoint")
    bench.add_argument("--image-size", type=int, default=1024, help="the image's width and height (default 1024)")
    bench.set_defaults(func=_bench)

    serve = sub.add_parser("serve", help="serve OpenAI- and DashScope-compatible HTTP APIs")
    _model_args(serve)
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--allowed-hosts", nargs="+", metavar="HOST",
                       help="host names (Host header) served beside localhost, 127.0.0.1, ::1 and --host; "
                            "'*' allows any (default: those only, a guard against DNS rebinding)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: QWENKIT_API_KEY, else none)")
    serve.add_argument("--served-model-name", nargs="+", help="model names clients use (default: the model's own)")
    serve.add_argument("--max-num-seqs", type=int,
                       help="sequences the engine batches at once (default: the engine's, 32 on CPU, 256 on CUDA)")
    serve.add_argument("--max-running-requests", type=int, default=64, help="requests generating at once")
    serve.add_argument("--max-waiting-requests", type=int, default=256,
                       help="requests waiting for a turn; past it the server answers 429")
    serve.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="largest request body (413 past it)")
    serve.add_argument("--allow-image-urls", action="store_true",
                       help="fetch http(s) image URLs in messages (20 MiB, 10 s each; they reach what this host "
                            "reaches: trusted clients only). Off: images come inline as data: URLs")
    serve.add_argument("--request-timeout", type=float, help="seconds a generation may run (default: no limit)")
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish after SIGTERM")
    serve.add_argument("--no-web", action="store_true", help="do not serve the web chat page at /")
    serve.add_argument("--task", choices=["generate", "embed", "rerank"],
                       help="serve the model as this in place of what its checkpoint says it is (rerank: "
                            "Qwen3-Reranker's yes/no scoring on /v1/rerank, for a reranker not named one)")
    serve.add_argument("--mcp", metavar="CONFIG_JSON",
                       help='MCP servers ({"mcpServers": {...}}) whose tools the web page can call')
    serve.add_argument("--chat-db", help="SQLite file for the web page's conversations "
                       "(default: conversations.sqlite3 in the qwenkit home)")
    serve.add_argument("--responses-db", help="SQLite file for stored /v1/responses (previous_response_id) "
                       "(default: responses.sqlite3 in the qwenkit home)")
    serve.add_argument("--ray", action="store_true",
                       help="serve replicas of the model on Ray Serve (pip install 'qwenkit[ray]'; docs/scale.md)")
    serve.add_argument("--replicas", type=int, default=1, help="with --ray: how many replicas")
    serve.add_argument("--ray-address", help="with --ray: the Ray cluster to join (default: RAY_ADDRESS, else a "
                       "local one)")
    serve.set_defaults(func=_serve)

    pull = sub.add_parser("pull", help="download a model from the Hugging Face Hub (resumes a partial download)")
    pull.add_argument("model", help="a short name (qwen3:0.6b, qwen3:8b-q4_k_m) or a repo id (Qwen/Qwen3-0.6B)")
    pull.add_argument("file", nargs="?", help="one .gguf file of the repo (e.g. Qwen3-8B-Q4_K_M.gguf)")
    pull.set_defaults(func=_pull)
    ls = sub.add_parser("list", aliases=["ls"], help="the models on this machine")
    ls.add_argument("--json", action="store_true", help="print one JSON object per model")
    ls.set_defaults(func=_list)
    show = sub.add_parser("show", help="a model's architecture, size, quantization and capabilities")
    show.add_argument("model", nargs="?", default="default", help="a name `qwenkit list` shows, a folder or a .gguf")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=_show)
    rm = sub.add_parser("rm", help="delete a model from this machine")
    rm.add_argument("model", nargs="+", help="names as `qwenkit list` shows them")
    rm.set_defaults(func=_rm)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from qwenkit import __version__

    try:
        torch = f"torch {version('torch')}"
    except PackageNotFoundError:
        torch = "no torch"
    return f"qwenkit {__version__} ({torch}, Python {sys.version.split()[0]})"


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", "-m", default="default",
        help="'default' (embedded Qwen2.5-Coder-0.5B-Instruct), a short name (qwen3:8b, qwen3:8b-q4_k_m), "
             "a model folder, a .gguf file, or a HF repo id",
    )
    p.add_argument(
        "--dtype", choices=["bfloat16", "float32", "float16"],
        help="compute dtype (default: bfloat16 on CUDA and AMX/AVX512-BF16 CPUs, else float32)",
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument(
        "--kv-cache-memory",
        help="memory for the paged KV cache, e.g. 4GiB (default: QWENKIT_KV_CACHE_MEMORY, else 2GiB)",
    )
    p.add_argument(
        "--kv-cache-dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
        help="KV cache storage (default auto: float16 on a CPU computing in float32, else the compute dtype)",
    )
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument(
        "--quantization", choices=["auto", "gguf", "none", "int8", "int4"], default="auto",
        help="weight format in memory (default auto: GGUF weights stay quantized, safetensors as the dtype; "
             "gguf: every GGUF block type with a kernel kept as stored, the smallest)",
    )
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step with torch.compile, in place of the fused C decode step "
                        "that quantized CPU models otherwise take (default: off)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="on CUDA, run decode steps eagerly instead of replaying CUDA graphs captured at start")
    p.add_argument("--deterministic", action="store_true",
                   help="on the CPU, a request's tokens do not depend on the rest of the batch, prompt "
                        "chunking or prefix-cache hits (batch-invariant kernels; slower: docs/determinism.md)")
    p.add_argument("--speculative", default="ngram", metavar="METHOD",
                   help="speculative decoding, which changes no output: ngram (the default; prompt lookup: "
                        "drafts from the prompt and output so far, paying where answers copy their input), "
                        "ngram:K (at most K drafts a step), draft:MODEL (a smaller model with the same "
                        "tokenizer), off; docs/speculative.md")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over this many GPUs (or CPU processes); see docs/scale.md")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="with --tensor-parallel-size: deal Qwen3-MoE experts out whole to the ranks")
    p.add_argument("--no-memory-check", action="store_true",
                   help="load even when the memory plan says the model will not fit (QWENKIT_NO_MEMORY_CHECK=1)")
    p.add_argument("--threads", type=int,
                   help="CPU threads computing (default: the cores this process may run on, by its affinity "
                        "and cgroup CPU quota, or OMP_NUM_THREADS; fewer is faster beside other busy programs)")


def _speculative_note(spec) -> str:
    if not spec.enabled:
        return ""
    if spec.method == "draft":
        return f"; speculative decoding: draft model {spec.draft_model}, up to {spec.num_speculative_tokens} drafts a step"
    return (f"; speculative decoding: prompt lookup, up to {spec.num_speculative_tokens} drafts a step "
            f"(n-grams of {spec.prompt_lookup_min}-{spec.prompt_lookup_max} tokens)")


def _threads_note(llm) -> str:
    """", 2 threads" on the CPU: how many threads compute (what --threads sets)."""
    if llm.device.type != "cpu":
        return ""
    import torch

    n = torch.get_num_threads()
    return f", {n} thread{'s' if n > 1 else ''}"


def _note_thinking_flags(llm, *, no_think: bool, budget: bool) -> None:
    """Say once when this model ignores the thinking options given."""
    from qwenkit.capabilities import detect_capabilities

    if no_think or budget:
        note = detect_capabilities(llm.tokenizer).thinking_note(llm.model_name, no_think=no_think, budget=budget)
        if note:
            _say(note)


def _run(args: argparse.Namespace) -> int:
    from qwenkit.sampling import SamplingParams

    prompt = args.prompt
    if prompt is None and sys.stdin.isatty():
        _say('no prompt given: starting the interactive chat (`qwenkit run "PROMPT"` answers one prompt; '
             "Ctrl-D leaves)")
        return _chat(_as_chat_args(args))
    params = SamplingParams(**{name: getattr(args, name) for name in sampling_fields.names_on("cli")
                               if name != "thinking_budget"})
    files = model_files(args)
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise QwenkitError("the prompt is empty")
    content = prompt
    if args.image:
        from qwenkit.multimodal import load_image_source

        # Decoded before the model loads: a bad file is one error line, at once.
        content = [{"type": "image", "image": load_image_source(path, allow_files=True)} for path in args.image]
        content.append({"type": "text", "text": prompt})
    llm = load_llm(args, files)
    _note_thinking_flags(llm, no_think=args.no_think, budget=args.thinking_budget is not None)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": content}
    ]
    dim = "\033[2m" if sys.stderr.isatty() else ""
    reset = "\033[0m" if dim else ""
    reasoning, content, last = [], [], None
    for chunk in llm.chat_stream(messages, params, enable_thinking=not args.no_think,
                                 thinking_budget=args.thinking_budget):
        last = chunk
        reasoning.append(chunk.delta.reasoning_content)
        content.append(chunk.delta.content)
        if not args.json:
            if chunk.delta.reasoning_content:
                sys.stderr.write(dim + chunk.delta.reasoning_content + reset)
                sys.stderr.flush()
            if chunk.delta.content:
                sys.stdout.write(chunk.delta.content)
                sys.stdout.flush()
    if args.json:
        out = {
            "reasoning_content": "".join(reasoning) or None,
            "content": "".join(content),
            "finish_reason": last.finish_reason,
            "usage": {"prompt_tokens": last.usage.prompt_tokens, "completion_tokens": last.usage.completion_tokens},
        }
        print(json.dumps(out, ensure_ascii=False))
    else:
        if any(reasoning) and not any(content):
            sys.stderr.write("\n")
        sys.stdout.write("\n")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from qwenkit.chat_cli import run_chat

    return run_chat(args)


def _as_chat_args(args: argparse.Namespace) -> argparse.Namespace:
    """`run`'s options as `chat` takes them (chat's own options at their defaults)."""
    chat_args = _parser().parse_args(["chat"])
    for name, value in vars(args).items():
        if name not in ("func", "command", "prompt", "json"):
            setattr(chat_args, name, value)
    if chat_args.max_tokens == RUN_MAX_TOKENS:  # run's default; chat's is the rest of the context
        chat_args.max_tokens = None
    return chat_args


def _bench(args: argparse.Namespace) -> int:
    if args.embed:
        return _bench_embed(args)
    if args.image:
        return _bench_image(args)
    if args.prompt_tokens is None:
        args.prompt_tokens = 512
    try:
        concurrency = tuple(int(c) for c in args.concurrency.split(","))
    except ValueError:
        raise QwenkitError(f"--concurrency takes numbers separated by commas, got {args.concurrency!r}") from None
    if args.prompt_tokens < 8 or args.decode_tokens < 2 or min(concurrency) < 1:
        raise QwenkitError("--prompt-tokens must be >= 8, --decode-tokens >= 2 and every concurrency >= 1")
    if args.repeats < 1:
        raise QwenkitError("--repeats must be >= 1")
    files = model_files(args)
    from qwenkit.engine.llm_engine import EngineArgs
    from qwenkit.llm import resolve_device

    # The engine's batch size for the device, unless the most streams measured need more.
    batch = EngineArgs().resolved(resolve_device(args.device)).max_num_seqs
    llm = load_llm(args, files, max_num_seqs=None if max(concurrency) <= batch else max(concurrency))
    from qwenkit.bench import as_dict, run_bench

    result = run_bench(llm, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                       concurrency=concurrency, repeats=args.repeats)
    print(json.dumps(as_dict(result)) if args.json else result.table())
    return 0


def _bench_image(args: argparse.Namespace) -> int:
    if args.image_size < 1 or args.repeats < 1:
        raise QwenkitError("--image-size and --repeats must be >= 1")
    files = model_files(args)
    llm = load_llm(args, files)
    from qwenkit.bench import run_image_bench

    try:
        import transformers  # noqa: F401
        compare = files.format == "hf"
    except ImportError:
        compare = False
    result = run_image_bench(llm, size=args.image_size, repeats=args.repeats, transformers=compare)
    print(json.dumps(result.as_dict()) if args.json else result.line())
    return 0


def _bench_embed(args: argparse.Namespace) -> int:
    tokens = 256 if args.prompt_tokens is None else args.prompt_tokens
    if tokens < 1 or args.repeats < 1:
        raise QwenkitError("--prompt-tokens and --repeats must be >= 1")
    llm = _embedding_llm(args, model_files(args))
    from qwenkit.bench import run_embed_bench

    result = run_embed_bench(llm, num_texts=16, num_tokens=tokens, repeats=args.repeats)
    print(json.dumps(dataclasses.asdict(result)) if args.json else result.line())
    return 0


def _embedding_llm(args: argparse.Namespace, files):
    """The model `args` names, loaded, when its checkpoint says it embeds (else one error)."""
    from qwenkit.capabilities import model_capabilities

    llm = load_llm(args, files)
    if not model_capabilities(llm).embedding:
        raise QwenkitError(f"{llm.model_name} is not an embedding model and cannot embed: give an embedding "
                           "model such as Qwen3-Embedding (--model Qwen/Qwen3-Embedding-0.6B)")
    return llm


def _embed(args: argparse.Namespace) -> int:
    from qwenkit.embedding import DEFAULT_QUERY_TASK

    if args.query and args.instruction:
        raise QwenkitError("--query and --instruction are one choice: give one")
    if args.dimensions is not None and args.dimensions < 1:
        raise QwenkitError(f"--dimensions must be >= 1, got {args.dimensions}")
    files = model_files(args)
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise QwenkitError("no texts to embed: give them as arguments or one a line on standard input")
    llm = _embedding_llm(args, files)
    instruction = DEFAULT_QUERY_TASK if args.query else args.instruction
    vectors = llm.embed(texts, instruction=instruction, dimensions=args.dimensions)
    for i, vector in enumerate(vectors):
        print(json.dumps({"index": i, "embedding": vector}))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from qwenkit import kernels
    from qwenkit.server import ServerConfig, serve
    from qwenkit.server.security import exposure_warning

    config = ServerConfig(
        served_model_names=args.served_model_name,
        api_key=args.api_key or os.environ.get("QWENKIT_API_KEY") or None,
        max_body_bytes=args.max_body_bytes,
        allow_image_urls=args.allow_image_urls,
        max_running_requests=args.max_running_requests,
        max_waiting_requests=args.max_waiting_requests,
        request_timeout_s=args.request_timeout,
        web=not args.no_web,
        mcp_config=args.mcp,
        chat_db=args.chat_db,
        responses_db=args.responses_db,
        allowed_hosts=args.allowed_hosts,
    )
    warning = exposure_warning(args.host, config.api_key)
    if warning:  # first, whatever follows: a wrong model path ends the process next
        print(warning, file=sys.stderr, flush=True)
    if args.ray:
        from qwenkit.serving import serve_on_ray

        serve_on_ray(args.model, replicas=args.replicas, host=args.host, port=args.port, address=args.ray_address,
                     server=config, max_num_seqs=args.max_num_seqs, task=args.task, **_llm_kwargs(args))
        return 0
    allm = load_llm(args, engine="AsyncLLM", max_num_seqs=args.max_num_seqs, task=args.task)
    names = args.served_model_name or _served_names(args.model, allm.llm.model_name)
    config = dataclasses.replace(config, served_model_names=names)
    running = (f"{str(allm.llm.dtype).removeprefix('torch.')} on {allm.llm.device}{_threads_note(allm.llm)}, "
               f"{kernels.summary(allm.llm.device)}"
               f"{'; deterministic (batch-invariant steps)' if allm.llm.engine.runner.deterministic else ''}"
               f"{_speculative_note(allm.llm.engine.speculative)}")

    def ready(port: int) -> None:
        for line in serve_banner(config, host=args.host, port=port, capabilities=_capability_names(allm.llm),
                                 running=running):
            _say(line)

    serve(allm, config, host=args.host, port=args.port, drain_timeout_s=args.drain_timeout, on_ready=ready)
    return 0


def _served_names(spec: str, model_name: str) -> list[str]:
    """The model's own name, and the short name it was asked for by (qwen3:8b), if any."""
    from qwenkit.model_files import local_path
    from qwenkit.model_names import is_short_name, lookup

    names = [model_name]
    if is_short_name(spec) and local_path(spec) is None:
        try:
            short = lookup(spec).name
        except ValueError:
            return names
        if short != model_name:
            names.append(short)
    return names


def _capability_names(llm) -> list[str]:
    from qwenkit.capabilities import model_capabilities

    return model_capabilities(llm).names()


def serve_banner(config, *, host: str, port: int, capabilities: list[str], running: str | None = None) -> list[str]:
    """What `qwenkit serve` prints once it listens: where, which model names, the page, the key,
    and (`running`) the dtype, device and kernels."""
    everywhere = host in ("0.0.0.0", "::", "")
    shown = "127.0.0.1" if everywhere else host
    base = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"
    where = f"{base} (listening on all interfaces)" if everywhere else base
    from qwenkit.server.openai_protocol import DEFAULT_MODEL

    names = ", ".join([*config.served_model_names, DEFAULT_MODEL])
    lines = [
        f"ready at {where}: OpenAI API {base}/v1, DashScope API {base}/api/v1",
        f"model name for requests: {names} (capabilities: {', '.join(capabilities)})",
        *([f"running: {running}"] if running else []),
        f"web chat page: {base}/" if config.web else "web chat page: off (--no-web)",
    ]
    if config.api_key:
        lines.append("API key: required (Authorization: Bearer KEY)")
    else:
        lines.append("API key: none required (--api-key or QWENKIT_API_KEY sets one)")
    return lines


# -- model management ---------------------------------------------------------------------


def _pull(args: argparse.Namespace) -> int:
    from qwenkit.hub import describe, format_size, pull

    name = args.model if args.file is None else f"{args.model}/{args.file}"
    _warn_if_it_will_not_fit(name, args.model, args.file)
    _say(f"pulling {name} from the Hugging Face Hub (an interrupted pull resumes where it stopped)")
    files = pull(args.model, args.file, progress=sys.stderr.isatty())
    info = describe(files)
    size = files.path.stat().st_size if files.format == "gguf" else sum(
        p.stat().st_size for p in files.path.iterdir() if p.is_file())
    _say(f"pulled {name}: {format_size(size)} in {files.path}")
    _say(f"use it with: qwenkit run --model {name} \"...\"  (capabilities: {', '.join(info.capabilities.names())})")
    return 0


def _warn_if_it_will_not_fit(name: str, spec: str, file: str | None) -> None:
    """Before a pull: say when what it downloads will not fit this machine (the download goes on)."""
    from qwenkit import hub, memory_plan

    plan = hub.plan_remote(spec, file)
    if plan is None:
        return
    available = memory_plan.available_memory("cpu")
    if plan.total > available:
        _say(f"warning: {name} needs {plan.summary()} on the CPU, this machine has {memory_plan.gib(available)} "
             "free: it will not load here without more memory (a GPU, or a smaller variant)")


def _memory_plan(files):
    """The model's memory plan on the CPU with the engine's defaults (qwenkit/memory_plan.py),
    or None when its headers cannot be planned from."""
    from qwenkit.memory_plan import plan_files

    try:
        return plan_files(files)
    except (QwenkitError, OSError, ValueError, KeyError):
        return None


def _list(args: argparse.Namespace) -> int:
    from qwenkit.hub import describe, format_parameters, format_size, list_models
    from qwenkit.memory_plan import gib

    rows = []
    for model in list_models():
        try:
            info, plan = describe(model.files), _memory_plan(model.files)
            row = [model.name, info.architecture, format_parameters(info.num_parameters), info.quantization,
                   format_size(model.size_bytes), gib(plan.total) if plan else "?", ",".join(info.capabilities.names())]
        except (QwenkitError, OSError, ValueError) as e:
            info, plan = None, None
            row = [model.name, "?", "?", "?", format_size(model.size_bytes), "?", f"unreadable: {e}"]
        if args.json:
            print(json.dumps({"name": model.name, "aliases": list(model.aliases), "source": model.source,
                              "path": str(model.files.path), "size_bytes": model.size_bytes,
                              **(_info_dict(info) if info else {}), **_memory_dict(plan)}))
        rows.append([*row, ",".join(model.aliases)])
    if not args.json:
        header = ["NAME", "ARCH", "PARAMS", "QUANT", "SIZE", "NEEDS", "CAPABILITIES", "ALIAS"]
        if not any(row[-1] for row in rows):  # the default model's "default", when it is here
            header, rows = header[:-1], [row[:-1] for row in rows]
        _print_table(header, rows)
        if not rows:
            print("no models yet: `qwenkit pull qwen3:0.6b`, or pip install 'qwenkit[default-model]'")
    return 0


def _info_dict(info) -> dict:
    return {"architecture": info.architecture, "parameters": info.num_parameters,
            "quantization": info.quantization, "context_length": info.context_length,
            "capabilities": info.capabilities.names()}


def _memory_dict(plan) -> dict:
    """The memory plan as JSON fields (none without a plan)."""
    if plan is None:
        return {}
    return {"memory": {"total_bytes": plan.total, "weights_bytes": plan.weights, "kv_cache_bytes": plan.kv_cache,
                       "activations_bytes": plan.activations, "kv_tokens": plan.kv_tokens, "device": plan.device,
                       "dtype": plan.dtype}}


def _print_table(header: list[str] | None, rows: list[list[str]]) -> None:
    lines = ([header] if header else []) + rows
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(lines[0]))] if lines else []
    for row in lines:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


def _show(args: argparse.Namespace) -> int:
    from qwenkit.hub import describe, format_parameters, local_files

    files = local_files(args.model)
    info = describe(files)
    if args.json:
        print(json.dumps({"name": args.model, "model": files.name, "path": str(files.path), **_info_dict(info),
                          **_memory_dict(_memory_plan(files))}))
        return 0
    caps = info.capabilities
    thinking = ("yes, switchable (enable_thinking, /think, /no_think)" if caps.hybrid_thinking
                else "always (a thinking budget caps it)" if caps.thinking else "no")
    rows = [
        ["model", files.name], ["path", str(files.path)], ["architecture", info.architecture],
        ["parameters", format_parameters(info.num_parameters)], ["quantization", info.quantization],
        ["context length", str(info.context_length)], ["capabilities", ", ".join(caps.names())],
        ["thinking", thinking], ["tools", "yes" if caps.tools else "no"],
        ["memory", _memory_line(files)],
    ]
    _print_table(None, rows)
    return 0


def _memory_line(files) -> str:
    """What the model needs on the CPU with the engine's defaults, and what this machine has."""
    from qwenkit.memory_plan import available_memory, gib

    plan = _memory_plan(files)
    if plan is None:
        return "? (its headers lack what the plan needs)"
    available = available_memory("cpu")
    fits = "fits" if plan.total <= available else "does not fit"
    return f"{plan.summary()} on the CPU in {plan.dtype}; {gib(available)} free here: {fits}"


def _rm(args: argparse.Namespace) -> int:
    from qwenkit.hub import format_size, remove

    for spec in args.model:
        model, freed = remove(spec)
        note = " (its installed packages assemble it again on next use)" if model.aliases else ""
        print(f"deleted {model.name} ({model.source}, {format_size(freed)} freed){note}")
    return 0
