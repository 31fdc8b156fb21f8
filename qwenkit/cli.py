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
    run.add_argument("--max-tokens", type=int, default=4096, help="most tokens to generate (default 4096)")
    run.add_argument("--temperature", type=float, help="0 for greedy; default from the model or Qwen3's per-mode values")
    run.add_argument("--top-p", type=float)
    run.add_argument("--top-k", type=int)
    run.add_argument("--seed", type=int)
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    run.set_defaults(func=_run)
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


def _run(args: argparse.Namespace) -> int:
    from qwenkit.thinking import ThinkingSplitter
    from qwenkit.llm import LLM
    from qwenkit.sampling import QWEN3_NON_THINKING, QWEN3_THINKING, SamplingParams

    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise QwenkitError("the prompt is empty")
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_tokens=args.max_tokens, seed=args.seed,
    )
    llm = LLM(args.model, dtype=args.dtype, device=args.device, progress=sys.stderr.isatty())
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]
    enable_thinking = not args.no_think
    prompt_text = llm.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, enable_thinking=enable_thinking
    )
    prompt_ids = llm.tokenizer.encode(prompt_text)
    splitter = ThinkingSplitter.for_prompt(llm.tokenizer, prompt_ids)
    fallback = QWEN3_THINKING if enable_thinking else QWEN3_NON_THINKING
    dim = "\033[2m" if sys.stderr.isatty() else ""
    reset = "\033[0m" if dim else ""
    completion_tokens, finish = 0, None
    for update in llm.stream(prompt_ids, params, fallback=fallback):
        finish = update.finish_reason
        for token in update.outputs:
            completion_tokens += 1
            reasoning, content = splitter.feed(token.token_id, token.text)
            if not args.json:
                if reasoning:
                    sys.stderr.write(dim + reasoning + reset)
                    sys.stderr.flush()
                if content:
                    sys.stdout.write(content)
                    sys.stdout.flush()
    if args.json:
        out = {
            "reasoning_content": splitter.reasoning or None,
            "content": splitter.content,
            "finish_reason": finish,
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens},
        }
        print(json.dumps(out, ensure_ascii=False))
    else:
        if splitter.reasoning and not splitter.content:
            sys.stderr.write("\n")
        sys.stdout.write("\n")
    return 0
