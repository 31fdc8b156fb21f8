"""The `qwenkit` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from qwenkit.errors import QwenkitError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="qwenkit: %(message)s")
    try:
        return args.func(args)
    except (QwenkitError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenkit", description="Run Qwen-family models locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer one prompt with the chat template and exit")
    _model_args(run)
    run.add_argument("prompt", nargs="?", help="the user message ('-' or absent: read standard input)")
    run.add_argument("--system", help="a system prompt")
    run.add_argument("--no-think", action="store_true", help="answer without thinking (Qwen3 enable_thinking=False)")
    run.add_argument("--thinking-budget", type=int, help="most thinking tokens before the model must answer (0: none)")
    run.add_argument("--max-tokens", type=int, default=4096, help="most tokens to generate (default 4096)")
    run.add_argument(
        "--temperature", type=float, help="0 for greedy; default from the model or Qwen3's per-mode values"
    )
    run.add_argument("--top-p", type=float)
    run.add_argument("--top-k", type=int)
    run.add_argument("--seed", type=int)
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    run.set_defaults(func=_run)

    chat = sub.add_parser("chat", help="chat in the terminal, with memory, thinking and tools")
    _model_args(chat)
    chat.add_argument("--base-url", help="an OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) instead of "
                      "the local model; --model is then the served model name (default: the endpoint's first)")
    chat.add_argument("--api-key", help="the endpoint's key (default: QWENKIT_API_KEY, else OPENAI_API_KEY)")
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--no-think", action="store_true", help="start with thinking off (/think turns it on)")
    chat.add_argument("--thinking-budget", type=int, help="most thinking tokens per answer (/budget N)")
    chat.add_argument("--max-tokens", type=int, help="most tokens per answer")
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--top-p", type=float)
    chat.add_argument("--top-k", type=int)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--resume", metavar="ID", help="continue a stored conversation")
    chat.add_argument("--db", help="the conversations' SQLite file (default: chat.sqlite3 in the qwenkit home)")
    chat.add_argument("--max-history", type=int, default=40, help="past messages sent with each turn (default 40)")
    chat.add_argument("--mcp", metavar="CONFIG_JSON", help='MCP servers ({"mcpServers": {...}}) whose tools the '
                      "model may call")
    chat.set_defaults(func=_chat)

    bench = sub.add_parser("bench", help="measure prefill / decode speed, time to first token and memory")
    _model_args(bench)
    bench.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for prefill and TTFT")
    bench.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per stream")
    bench.add_argument("--concurrency", default="1,4,8,16", help="comma-separated stream counts (default 1,4,8,16)")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.set_defaults(func=_bench)

    serve = sub.add_parser("serve", help="serve OpenAI- and DashScope-compatible HTTP APIs")
    _model_args(serve)
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: QWENKIT_API_KEY, else none)")
    serve.add_argument("--served-model-name", nargs="+", help="model names clients use (default: the model's own)")
    serve.add_argument("--max-num-seqs", type=int, default=32, help="sequences the engine batches at once")
    serve.add_argument("--max-running-requests", type=int, default=64, help="requests generating at once")
    serve.add_argument("--max-waiting-requests", type=int, default=256,
                       help="requests waiting for a turn; past it the server answers 429")
    serve.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="largest request body (413 past it)")
    serve.add_argument("--request-timeout", type=float, help="seconds a generation may run (default: no limit)")
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish after SIGTERM")
    serve.add_argument("--no-web", action="store_true", help="do not serve the web chat page at /")
    serve.add_argument("--mcp", metavar="CONFIG_JSON",
                       help='MCP servers ({"mcpServers": {...}}) whose tools the web page can call')
    serve.add_argument("--chat-db", help="SQLite file for the web page's conversations "
                       "(default: conversations.sqlite3 in the qwenkit home)")
    serve.set_defaults(func=_serve)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", "-m", default="default",
        help="'default' (embedded Qwen2.5-Coder-0.5B-Instruct), a model folder, a .gguf file, or a HF repo id",
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


def _run(args: argparse.Namespace) -> int:
    from qwenkit.llm import LLM
    from qwenkit.sampling import SamplingParams

    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise QwenkitError("the prompt is empty")
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_tokens=args.max_tokens, seed=args.seed,
    )
    llm = LLM(args.model, dtype=args.dtype, device=args.device, progress=sys.stderr.isatty(),
              kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype,
              max_model_len=args.max_model_len,
              quantization=args.quantization, compile=args.compile)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
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


def _bench(args: argparse.Namespace) -> int:
    from qwenkit.bench import as_dict, run_bench
    from qwenkit.llm import LLM

    try:
        concurrency = tuple(int(c) for c in args.concurrency.split(","))
    except ValueError:
        raise QwenkitError(f"--concurrency takes numbers separated by commas, got {args.concurrency!r}") from None
    if args.prompt_tokens < 8 or args.decode_tokens < 2 or min(concurrency) < 1:
        raise QwenkitError("--prompt-tokens must be >= 8, --decode-tokens >= 2 and every concurrency >= 1")
    llm = LLM(args.model, dtype=args.dtype, device=args.device, progress=sys.stderr.isatty(),
              kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype,
              max_model_len=args.max_model_len,
              quantization=args.quantization, compile=args.compile,
              max_num_seqs=max(32, max(concurrency)))
    result = run_bench(llm, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                       concurrency=concurrency)
    print(json.dumps(as_dict(result)) if args.json else result.table())
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from qwenkit.async_llm import AsyncLLM
    from qwenkit.server import ServerConfig, serve

    config = ServerConfig(
        served_model_names=args.served_model_name,
        api_key=args.api_key or os.environ.get("QWENKIT_API_KEY") or None,
        max_body_bytes=args.max_body_bytes,
        max_running_requests=args.max_running_requests,
        max_waiting_requests=args.max_waiting_requests,
        request_timeout_s=args.request_timeout,
        web=not args.no_web,
        mcp_config=args.mcp,
        chat_db=args.chat_db,
    )
    allm = AsyncLLM(args.model, dtype=args.dtype, device=args.device, progress=sys.stderr.isatty(),
                    kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype,
                    max_model_len=args.max_model_len,
                    quantization=args.quantization, compile=args.compile,
                    max_num_seqs=args.max_num_seqs)
    from qwenkit import kernels

    print(f"qwenkit: {allm.llm.model_name}, {str(allm.llm.dtype).removeprefix('torch.')} on {allm.llm.device}; "
          f"{kernels.summary(allm.llm.device)}", file=sys.stderr)
    serve(allm, config, host=args.host, port=args.port, drain_timeout_s=args.drain_timeout)
    return 0
