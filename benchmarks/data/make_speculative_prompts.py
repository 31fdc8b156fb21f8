"""Writes the workloads of bench_speculative.py: speculative_edit.jsonl, speculative_chat.jsonl.

    python benchmarks/data/make_speculative_prompts.py

edit: 50 requests to rewrite a function, a third each "add type hints and a docstring",
"rename a variable", "fix the marked bug". The functions are pure-Python functions of CPython
3.11's standard library (PSF License 2.0, permissive), 8 to 30 lines, taken in a fixed order
from fixed modules; the bug is made by flipping one comparison and marking its line. chat: 50
questions whose answers have no text to copy from the prompt. Both files are committed; this
script says how they were made (it needs Python 3.11's standard library to reproduce them).
"""

from __future__ import annotations

import ast
import inspect
import json
import textwrap
from pathlib import Path

MODULES = ["textwrap", "bisect", "heapq", "fnmatch", "shlex", "statistics", "colorsys", "calendar", "difflib",
           "string", "ipaddress", "fractions", "json.encoder", "urllib.parse", "email.utils", "html", "glob",
           "posixpath", "random", "base64", "csv", "tokenize", "inspect", "dataclasses", "functools"]
FLIPS = {ast.Lt: "<=", ast.LtE: "<", ast.Gt: ">=", ast.GtE: ">", ast.Eq: "!=", ast.NotEq: "=="}
SYMBOLS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}


def functions():
    seen = set()
    for name in MODULES:
        module = __import__(name, fromlist=["_"])
        source = inspect.getsource(module)
        for node in ast.parse(source).body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("__"):
                continue
            text = textwrap.dedent(ast.get_source_segment(source, node))
            lines = text.count("\n") + 1
            if 8 <= lines <= 30 and text not in seen:
                seen.add(text)
                yield name, node.name, text


def local_name(text: str) -> str | None:
    tree = ast.parse(text)
    args = {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg)}
    names = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]
    names = [n for n in names if n not in args and len(n) > 1]
    return names[0] if names else None


def with_bug(text: str) -> str | None:
    lines = text.splitlines()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Compare) and type(node.ops[0]) in FLIPS:
            line = lines[node.lineno - 1]
            old = f" {SYMBOLS[type(node.ops[0])]} "
            if line.count(old) == 1:
                lines[node.lineno - 1] = line.replace(old, f" {FLIPS[type(node.ops[0])]} ") + "  # BUG: wrong comparison"
                return "\n".join(lines)
    return None


def edit_prompts(count: int = 50) -> list[dict]:
    prompts = []
    for module, func, text in functions():
        kind = ("hints", "rename", "bug")[len(prompts) % 3]
        if kind == "hints":
            ask = f"Add type hints and a docstring to this function from Python's {module} module. Reply with the whole function, code only.\n\n```python\n{text}\n```"
        elif kind == "rename":
            name = local_name(text)
            if name is None:
                continue
            ask = f"Rename the variable `{name}` to `{name}_value` in this function. Reply with the whole function, code only.\n\n```python\n{text}\n```"
        else:
            buggy = with_bug(text)
            if buggy is None:
                continue
            ask = f"The line marked BUG has a wrong comparison. Fix it and reply with the whole corrected function, code only.\n\n```python\n{buggy}\n```"
        prompts.append({"id": f"{module}.{func}", "task": kind, "messages": [{"role": "user", "content": ask}]})
        if len(prompts) == count:
            break
    return prompts


CHAT = [
    "Why is the sky blue? Answer in a short paragraph.", "What causes the seasons on Earth?",
    "Give three tips for sleeping better.", "Explain photosynthesis to a ten-year-old.",
    "What is the difference between weather and climate?", "Why do cats purr?",
    "Suggest a name for a small bakery and explain why.", "How do vaccines train the immune system?",
    "What are the main causes of inflation?", "Describe the water cycle in four sentences.",
    "Why did the Roman Empire fall? Give the main theories.", "How does a rainbow form?",
    "What should I pack for a weekend hiking trip?", "Explain what a black hole is.",
    "Write a haiku about autumn rain.", "What are the benefits of learning a second language?",
    "How do bees make honey?", "Why is the ocean salty?", "Give me a simple recipe for pancakes.",
    "What is the theory of evolution, in brief?", "How do airplanes stay in the air?",
    "What makes a good first impression at a job interview?", "Why do leaves change colour in autumn?",
    "Explain the difference between a virus and a bacterium.", "What is the tallest mountain and how was it measured?",
    "Write a short poem about the sea.", "How do tides work?", "What are three ways to reduce stress?",
    "Why do we dream?", "What is the greenhouse effect?", "How should I start learning to play the guitar?",
    "Describe the taste of a lemon to someone who never had one.", "Why do onions make people cry?",
    "What is the history of the Olympic Games, briefly?", "How does the heart pump blood?",
    "What is a good way to memorize a speech?", "Why is exercise good for the brain?",
    "Explain how a compass works.", "What is the difference between a lake and a pond?",
    "Write a two-sentence story about a lost key.", "How do birds know where to migrate?",
    "What are the pros and cons of working from home?", "Why does ice float on water?",
    "How is paper made?", "What is the speed of light and why does it matter?",
    "How can I make my houseplants healthier?", "What is a volcano and why does it erupt?",
    "Explain supply and demand with an everyday example.", "Why do we have time zones?",
    "What makes a story memorable?",
]


def main() -> None:
    here = Path(__file__).parent
    with open(here / "speculative_edit.jsonl", "w") as f:
        for p in edit_prompts():
            f.write(json.dumps(p) + "\n")
    with open(here / "speculative_chat.jsonl", "w") as f:
        for i, q in enumerate(CHAT):
            f.write(json.dumps({"id": f"chat{i}", "task": "chat", "messages": [{"role": "user", "content": q}]}) + "\n")


if __name__ == "__main__":
    main()
