"""Oversized prompts are refused before they are tokenized whole, in bounded memory.

`PromptSizeCheck` counts a large prompt's tokens in windows cut where the pre-tokenizer
splits anyway; the windows' counts must add up to the whole text's, on any text. Then a
real `qwenkit serve` process is sent 100 prompts far past its context, and its resident
memory must stay within 10% of where it started.
"""

import contextlib
import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from qwenkit.server.errors import APIError
from qwenkit.server.limits import PromptSizeCheck, vocabulary_bytes
from qwenkit.tokenizer import Tokenizer

# Letters, digits, CJK, spaces, newlines, contractions, combining marks and characters NFC
# changes (e + U+0301, U+0958 क़), emoji, a zero-width joiner, Hangul jamo, special tokens.
PIECES = list("abcXYZ  \n\n\r\t'.,!?-_0123456789") + [
    "é", "e\u0301", "中文", "，", "。", "²", "Ⅻ", "😀", "\u200d", "'s", "'LL", "   ", "<|im_start|>", "<|im_end|>",
    "<think>", "</think>", "ﬁ", "Å", "A\u030a", "\u1100\u1161", "가", "\u0301", "\u0b3e", "\u0b47", "\u0958",
]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_checkpoints) -> Tokenizer:
    return Tokenizer.from_dir(tiny_checkpoints("qwen3"))


@pytest.fixture(scope="module")
def qwen_tokenizer(default_gguf) -> Tokenizer:
    from qwenkit.loader.gguf import GGUFCheckpoint

    ckpt = GGUFCheckpoint(default_gguf)
    return Tokenizer(ckpt.tokenizer_backend(), chat_template=ckpt.chat_template, **ckpt.special_tokens())


@pytest.mark.parametrize("which", ["tiny_tokenizer", "qwen_tokenizer"])
def test_windows_are_cut_where_the_tokenizer_splits_anyway(which, request):
    tokenizer = request.getfixturevalue(which)
    check = PromptSizeCheck(tokenizer, 32768, window=40)
    rng = random.Random(0)
    num_cuts = 0
    for _ in range(500):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 150)))
        whole = tokenizer.encode(text)
        for i in check._cuts(text, 0, len(text)):
            assert tokenizer.encode(text[:i]) + tokenizer.encode(text[i:]) == whole, (text[:i], text[i:])
            num_cuts += 1
        # With cuts in every window the count is exact; without, it is a lower bound.
        assert check.count_at_least(text, 10**9) <= len(whole)
    assert num_cuts > 5000


def test_count_is_exact_on_prose_and_stops_early(qwen_tokenizer):
    check = PromptSizeCheck(qwen_tokenizer, 32768, window=256)
    rng = random.Random(1)
    prose = "\n".join(" ".join(rng.choice(["the", "model", "thinks,", "然后", "回答。", "x=42;", "tokens"])
                               for _ in range(rng.randint(1, 30))) for _ in range(300))
    assert check.count_at_least(prose, 10**9) == len(qwen_tokenizer.encode(prose))
    assert 100 < check.count_at_least(prose, 100) < 200  # stopped after the window that passed 100


def test_check_refuses_by_bytes_then_by_tokens(qwen_tokenizer):
    check = PromptSizeCheck(qwen_tokenizer, 1000, min_checked_bytes=1000)
    assert check.max_token_bytes == 128  # the longest Qwen token: 128 spaces
    with pytest.raises(APIError, match="bytes, more than a 1000-token context") as e:
        check.check(["word " * 30_000])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(APIError, match="the model's context is 1000 tokens"):
        check.check(["word " * 1000, "word " * 500])
    check.check(["word " * 400, "word " * 400])  # 800 tokens: fits
    # Small prompts are left to the engine's exact check, after it tokenizes them.
    PromptSizeCheck(qwen_tokenizer, 1000, min_checked_bytes=100_000).check(["word " * 2000])
    with pytest.raises(APIError, match="not valid Unicode"):
        check.check(["\ud800" * 2000])


@pytest.mark.parametrize("which", ["tiny_tokenizer", "qwen_tokenizer"])
def test_token_bytes_are_the_tokens_own(which, request):
    """Each token's bytes, read from its byte-level characters, are the bytes it decodes to
    (where it decodes to whole characters), and the masks hold exactly those bytes."""
    tokenizer = request.getfixturevalue(which)
    lengths, masks = vocabulary_bytes(tokenizer.backend)
    assert len(lengths) == tokenizer.backend.get_vocab_size(with_added_tokens=True)
    rng = random.Random(0)
    for token_id in rng.sample(range(len(lengths)), min(1000, len(lengths))):
        decoded = tokenizer.decode([token_id])
        if "\ufffd" not in decoded:
            data = decoded.encode()
            assert lengths[token_id] == len(data), decoded
            bits = np.unpackbits(masks[token_id].view(np.uint8), bitorder="little")
            assert set(np.flatnonzero(bits)) == set(data), decoded


@pytest.mark.parametrize("which", ["tiny_tokenizer", "qwen_tokenizer"])
def test_the_byte_bound_never_passes_the_true_count(which, request):
    """Runs of one character (what has no split point), and random text, with and without
    open ends: the count from bytes is a lower bound of the tokens."""
    tokenizer = request.getfixturevalue(which)
    check = PromptSizeCheck(tokenizer, 32768)
    rng = random.Random(2)
    texts = [c * n for c in ["a", "Z", " ", "\n", "中", "😀", "é", "e\u0301", "가", "0", "=", "-"] for n in (1, 7, 300, 2000)]
    texts += ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 400))) for _ in range(60)]
    for text in texts:
        n = len(tokenizer.encode(text))
        assert check.tokens_inside(text, num_open_edges=0) <= n, text[:40]
        for i in {len(text) // 3, len(text) // 2}:  # the pieces of a text cut anywhere
            assert check.tokens_inside(text[:i], num_open_edges=1) + check.tokens_inside(text[i:], num_open_edges=1) <= n
    assert check.tokens_inside("a" * 10_000, num_open_edges=2) > 10_000 // check.max_token_bytes


def test_a_prompt_without_split_points_is_refused_by_its_bytes(tiny_tokenizer):
    check = PromptSizeCheck(tiny_tokenizer, 100_000)
    check.warm()
    assert 1_000_000 < 100_000 * check.max_token_bytes  # under the plain byte bound
    begun = time.perf_counter()
    with pytest.raises(APIError, match="at least 999") as e:
        check.check(["a" * 1_000_000])
    assert time.perf_counter() - begun < 1.0 and e.value.code == "context_length_exceeded"
    check.check(["a" * 60_000])  # fits: left to the engine


def test_huge_prompts_without_split_points_are_refused_at_once(qwen_tokenizer):
    """The issue's case: 3.9 MB of "a" or of CJK took 13-15 s to tokenize before its refusal.
    Measured 0.05-0.07 s each once the vocabulary's bytes are read (0.7 s, at server start)."""
    check = PromptSizeCheck(qwen_tokenizer, 32768)
    check.warm()
    cjk = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(1_300_000))
    for text in ["a" * 3_900_000, cjk, "中" * 1_300_000, "a" * 3_800_000 + " hello world\n"]:
        begun = time.perf_counter()
        with pytest.raises(APIError, match="context is 32768 tokens"):
            check.check([text])
        assert time.perf_counter() - begun < 3.0  # < 0.2 s on an idle machine


# -- a real server -------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@contextlib.contextmanager
def default_model_server(default_gguf, *args: str):
    """`qwenkit serve` of the default model in its own process: (base URL, its process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "qwenkit", "serve", "--model", str(default_gguf), "--port", str(port), "--no-web",
         "--kv-cache-memory", "64MiB", "--max-body-bytes", str(4 * 1024 * 1024), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.5)
        yield base, server
    finally:
        server.kill()
        server.wait()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_refused_huge_prompts_leave_the_server_memory_where_it_was(default_gguf, tmp_path):
    with default_model_server(default_gguf, "--max-model-len", "4096") as (base, server):
        rng = random.Random(0)
        words = ["alpha", "beta", "gamma", "delta", "模型", "思考", "x1", "y2", "tool", "call"]

        def huge(num_bytes: int) -> str:
            text = " ".join(rng.choice(words) for _ in range(num_bytes // 5))
            return "\n".join(text[i:i + 200] for i in range(0, len(text), 200))

        # 3.5 MB: past the byte bound (4096 tokens x 128 bytes); 450 kB: under it, refused by count.
        prompts = [huge(3_500_000), huge(450_000)]
        requests = [
            ("/v1/chat/completions", lambda p: {"messages": [{"role": "user", "content": p}], "max_tokens": 1}),
            ("/v1/completions", lambda p: {"prompt": p, "max_tokens": 1}),
            ("/api/v1/services/aigc/text-generation/generation", lambda p: {"input": {"prompt": p}}),
        ]

        def send(i: int) -> None:
            route, body = requests[i % 3]
            r = httpx.post(base + route, json=body(prompts[i % 2]), timeout=120)
            assert r.status_code == 400, r.text[:300]
            assert "context" in r.text

        for i in range(6):  # warm up every route and both paths
            send(i)
        before = rss_bytes(server.pid)
        errors = []

        def worker(k: int) -> None:
            try:
                for i in range(k, 100, 4):
                    send(i)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        after = rss_bytes(server.pid)
        assert after <= before * 1.10, f"RSS grew from {before / 2**20:.0f} MiB to {after / 2**20:.0f} MiB"


@pytest.mark.slow
def test_huge_prompts_without_split_points_are_refused_at_once_by_a_server(default_gguf):
    """3.9 MB of "a" on the chat route and of CJK on /v1/responses, which took 13-15 s of
    tokenizing before their refusal, under a 32k context (past the plain byte bound's reach)."""
    cjk = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(1_300_000))
    requests = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 3_900_000}], "max_tokens": 1}),
        ("/v1/responses", {"input": cjk, "max_output_tokens": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": cjk}], "max_tokens": 1}),
        ("/v1/responses", {"input": "a" * 3_900_000, "max_output_tokens": 1}),
    ]
    with default_model_server(default_gguf, "--max-model-len", "32768") as (base, _):
        for route, body in requests:
            data = json.dumps(body, ensure_ascii=False).encode()
            begun = time.perf_counter()
            r = httpx.post(base + route, content=data, headers={"content-type": "application/json"}, timeout=120)
            took = time.perf_counter() - begun
            assert r.status_code == 400 and "context" in r.text, r.text[:300]
            assert took < 3.0, (route, took)  # ~0.1-0.3 s on an idle machine
