"""Bounded load test of `qwenkit serve` (loopback only; it stops by itself).

Starts `qwenkit serve` as a subprocess on a free 127.0.0.1 port (by default over a tiny
random Qwen3 built in a temp dir with tests/tiny.py; `--model PATH` or `--model default`
for a real one), waits for /health, then runs N concurrent streaming chat clients with a
fixed max_tokens; a quarter of them close their response after the first few chunks.

Checks (exit status 1 if any fails):
- no 5xx answer (as seen by the clients, and in the server's own qwenkit_requests_total);
- every completed stream is well formed: each `data:` line is a JSON chunk with
  `choices[].delta`, one non-null finish_reason per choice, and the stream ends with
  `data: [DONE]`;
- after a short settle wait the KV pool is back to full (`qwenkit_kv_blocks_in_use` 0);
- (--hostile, on by default) 5,000 requests to random paths leave /metrics within 64 KB
  of its size, and 100 refused 0.45-3.5 MB prompts leave the server's RSS within 10%;
- SIGTERM stops the server.

    PYTHONPATH=. python benchmarks/load_server.py                  # tiny random model
    PYTHONPATH=. python benchmarks/load_server.py --model default  # embedded Qwen2.5-Coder-0.5B
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "load-test"
PROMPTS = [
    "Why is the sky blue?",
    "Write a haiku about autumn.",
    "List three prime numbers.",
    "What is the capital of France?",
]


@dataclass
class Result:
    index: int
    disconnect: bool
    status: int | None = None
    ttft: float | None = None
    latency: float | None = None
    tokens: int = 0
    completed: bool = False
    problems: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_model(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_checkpoint  # noqa: PLC0415

    make_checkpoint(folder, "qwen3", max_len=2048)
    return folder


def check_stream(lines: list[str], result: Result) -> None:
    """A completed stream: JSON chunks with choices/delta, one finish_reason per choice, [DONE] last."""
    data = [line[len("data:"):].strip() for line in lines if line.startswith("data:")]
    other = [line for line in lines if line and not line.startswith("data:") and not line.startswith(":")]
    if other:
        result.problems.append(f"non-SSE lines: {other[:2]!r}")
    if not data or data[-1] != "[DONE]":
        result.problems.append(f"does not end with data: [DONE] (last: {data[-1:]!r})")
    finishes: dict[int, int] = {}
    ids = set()
    for d in data[:-1] if data and data[-1] == "[DONE]" else data:
        if d == "[DONE]":
            result.problems.append("[DONE] before the end")
            continue
        try:
            chunk = json.loads(d)
        except json.JSONDecodeError:
            result.problems.append(f"data line is not JSON: {d[:80]!r}")
            continue
        if "error" in chunk:
            result.problems.append(f"error chunk: {chunk['error']}")
            continue
        if chunk.get("object") != "chat.completion.chunk":
            result.problems.append(f"object is {chunk.get('object')!r}")
        ids.add(chunk.get("id"))
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            result.problems.append("chunk without a choices list")
            continue
        if not choices:  # the usage chunk
            usage = chunk.get("usage")
            if usage is None:
                result.problems.append("chunk with empty choices and no usage")
            else:
                result.tokens = usage.get("completion_tokens", result.tokens)
            continue
        for c in choices:
            if not isinstance(c.get("delta"), dict):
                result.problems.append("choice without a delta")
            if c.get("finish_reason") is not None:
                finishes[c.get("index", 0)] = finishes.get(c.get("index", 0), 0) + 1
    if len(ids) > 1:
        result.problems.append(f"several ids in one stream: {sorted(map(str, ids))[:3]}")
    if finishes != {0: 1}:
        result.problems.append(f"finish_reason count per choice: {finishes}")


async def one_client(client: httpx.AsyncClient, index: int, disconnect: bool, args, start: asyncio.Event) -> Result:
    result = Result(index, disconnect)
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": f"{PROMPTS[index % len(PROMPTS)]} (client {index})"}],
        "max_tokens": args.max_tokens,
        "temperature": 0.7,
        "seed": index,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    await start.wait()
    begun = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.problems.append(f"HTTP {response.status_code}: {text[:200]}")
                return result
            lines: list[str] = []
            content_chunks = 0
            async for line in response.aiter_lines():
                lines.append(line)
                if line.startswith("data:") and line != "data: [DONE]":
                    if result.ttft is None:
                        result.ttft = time.perf_counter() - begun
                    content_chunks += 1
                    if disconnect and content_chunks >= args.disconnect_after:
                        break  # leaving the `async with` closes the connection mid-stream
            if disconnect:
                result.tokens = content_chunks
                result.latency = time.perf_counter() - begun
                return result
            result.latency = time.perf_counter() - begun
            check_stream(lines, result)
            result.completed = not result.problems
    except httpx.HTTPError as e:
        result.problems.append(f"{type(e).__name__}: {e}")
    return result


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{name} ([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def server_5xx(text: str) -> int:
    total = 0
    for m in re.finditer(r'^qwenkit_requests_total\{([^}]*)\} ([0-9.eE+-]+)$', text, re.M):
        status = re.search(r'status="(\d+)"', m.group(1))
        if status and status.group(1).startswith("5"):
            total += int(float(m.group(2)))
    return total


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def run_load(base: str, args) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    timeout = httpx.Timeout(args.time_limit, connect=10)
    n_disconnect = args.clients // 4
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as client:
        start = asyncio.Event()
        tasks = [asyncio.ensure_future(one_client(client, i, i % 4 == 3 and i // 4 < n_disconnect, args, start))
                 for i in range(args.clients)]
        await asyncio.sleep(0.1)
        begun = time.perf_counter()
        start.set()
        done, pending = await asyncio.wait(tasks, timeout=args.time_limit)
        wall = time.perf_counter() - begun
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    results = [t.result() for t in done]
    for i in range(len(pending)):
        r = Result(-1, False)
        r.problems.append(f"did not finish within the {args.time_limit:g} s time limit")
        results.append(r)
    return results, wall


async def wait_health(base: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=5) as client:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} before it was healthy")
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
    raise RuntimeError(f"the server was not healthy within {timeout:g} s")


async def warm_up(base: str) -> None:
    """One short request first, so the figures leave out first-call costs (tokenizer, template)."""
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        r = await client.post("/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        if r.status_code != 200:
            raise RuntimeError(f"warm-up request answered {r.status_code}: {r.text[:200]}")


async def kv_in_use_after_settle(base: str, settle: float) -> tuple[float | None, float | None, str]:
    """Poll /metrics for up to `settle` s until no block is in use; returns (in use, total, text)."""
    deadline = time.time() + settle
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        while True:
            text = (await client.get("/metrics")).text
            in_use = metric(text, "qwenkit_kv_blocks_in_use")
            running = metric(text, "qwenkit_requests_running")
            if (in_use == 0 and not running) or time.time() > deadline:
                return in_use, metric(text, "qwenkit_kv_blocks_total"), text
            await asyncio.sleep(0.2)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def hostile_phase(base: str, pid: int) -> tuple[list[str], list[str]]:
    """5,000 keyless requests to random paths, then 100 prompts of 0.45-3.5 MB (all refused):
    /metrics must stay small and the server's RSS within 10%. Returns (report lines, failures)."""
    import random
    import string

    rng = random.Random(0)
    report, failures, statuses = [], [], []
    with httpx.Client(base_url=base, timeout=120) as client:
        before = len(client.get("/metrics").content)
        for i in range(5000):
            path = rng.choice(("/v1/", "/api/", "/compatible-mode/", "/web/api/conversations/", "/")) + \
                "".join(rng.choices(string.ascii_letters, k=12))
            statuses.append(client.request("POST" if i % 3 == 0 else "GET", path).status_code)
        after = len(client.get("/metrics").content)
        report.append(f"/metrics after 5,000 random paths: {before} -> {after} bytes")
        if after > before + 64 * 1024:
            failures.append(f"/metrics grew from {before} to {after} bytes")
        words = ["alpha", "beta", "gamma", "delta", "模型", "x1", "tool"]
        prompts = [" ".join(rng.choice(words) for _ in range(n // 5)) for n in (3_500_000, 450_000)]
        routes = [("/v1/chat/completions", lambda p: {"messages": [{"role": "user", "content": p}]}),
                  ("/v1/completions", lambda p: {"prompt": p}),
                  ("/api/v1/services/aigc/text-generation/generation", lambda p: {"input": {"prompt": p}})]
        for i in range(6):  # warm up every route and both sizes
            route, body = routes[i % 3]
            statuses.append(client.post(route, json=body(prompts[i % 2])).status_code)
        rss_before, begun = rss_mib(pid), time.perf_counter()
        for i in range(100):
            route, body = routes[i % 3]
            r = client.post(route, json=body(prompts[i % 2]))
            statuses.append(r.status_code)
            if r.status_code != 400:
                failures.append(f"a {len(prompts[i % 2])}-byte prompt answered {r.status_code}, not 400")
                break
        rss_after = rss_mib(pid)
        report.append(f"RSS over 100 refused 0.45-3.5 MB prompts: {rss_before:.0f} -> {rss_after:.0f} MiB "
                      f"({time.perf_counter() - begun:.1f} s)")
        if rss_after > rss_before * 1.10:
            failures.append(f"RSS grew from {rss_before:.0f} to {rss_after:.0f} MiB")
    n5xx = sum(1 for status in statuses if status >= 500)
    report.append(f"hostile requests: {len(statuses)}, 5xx: {n5xx}")
    if n5xx:
        failures.append(f"{n5xx} 5xx answers to hostile requests")
    return report, failures


def stop_server(proc: subprocess.Popen, timeout: float) -> tuple[bool, int | None]:
    proc.send_signal(signal.SIGTERM)
    try:
        return True, proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False, proc.returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model for `qwenkit serve` (default: a tiny random Qwen3 built in a temp dir)")
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients (default 64)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    p.add_argument("--disconnect-after", type=int, default=3, help="chunks a disconnecting client reads (default 3)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly max_tokens per completed stream (default on)")
    p.add_argument("--time-limit", type=float, default=300, help="seconds the load phase may take (default 300)")
    p.add_argument("--startup-timeout", type=float, default=300, help="seconds to wait for /health (default 300)")
    p.add_argument("--settle", type=float, default=5, help="seconds to wait for the KV pool to empty (default 5)")
    p.add_argument("--hostile", action=argparse.BooleanOptionalAction, default=True,
                   help="then 5,000 random paths (/metrics must stay small) and 100 oversized prompts "
                        "(RSS within 10%%); reads the server's RSS from /proc (default: on)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-memory", help="passed to `qwenkit serve`")
    p.add_argument("--max-num-seqs", type=int, help="passed to `qwenkit serve`")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="qwenkit-load-") as tmp:
        if args.model is None:
            model = str(build_tiny_model(Path(tmp) / "tiny-qwen3"))
            model_desc = "tiny random Qwen3 (tests/tiny.py, 3 layers, hidden 64, max_len 2048)"
        else:
            model = model_desc = args.model
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "qwenkit", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", MODEL_NAME, "--dtype", args.dtype, "--drain-timeout", "10"]
        if args.model is None:
            cmd += ["--max-model-len", "2048"]
        if args.kv_cache_memory:
            cmd += ["--kv-cache-memory", args.kv_cache_memory]
        if args.max_num_seqs:
            cmd += ["--max-num-seqs", str(args.max_num_seqs)]
        log_path = Path(tmp) / "server.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        env.pop("QWENKIT_API_KEY", None)
        print("server:", " ".join(cmd), flush=True)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        failures: list[str] = []
        try:
            asyncio.run(wait_health(base, proc, args.startup_timeout))
            asyncio.run(warm_up(base))
            results, wall = asyncio.run(run_load(base, args))
            in_use, total_blocks, metrics_text = asyncio.run(kv_in_use_after_settle(base, args.settle))
            hostile_report, hostile_failures = hostile_phase(base, proc.pid) if args.hostile else ([], [])
            failures += hostile_failures
        except Exception as e:  # noqa: BLE001
            failures.append(f"{type(e).__name__}: {e}")
            results, wall, in_use, total_blocks, metrics_text, hostile_report = [], 0.0, None, None, "", []
        finally:
            stopped, code = stop_server(proc, timeout=30)
        if not stopped:
            failures.append("the server did not exit within 30 s of SIGTERM (killed)")
        # uvicorn shuts down gracefully, then re-raises the captured SIGTERM: exit code -15.
        graceful = "Finished server process" in log_path.read_text(errors="replace")
        if stopped and (code not in (0, -signal.SIGTERM) or not graceful):
            failures.append(f"the server did not shut down cleanly (exit code {code}, graceful: {graceful})")

        completed = [r for r in results if r.completed]
        disconnected = [r for r in results if r.disconnect and not r.problems and r.status == 200]
        broken = [r for r in results if r.problems]
        n5xx = sum(1 for r in results if r.status is not None and r.status >= 500)
        srv5xx = server_5xx(metrics_text)
        ttfts = [r.ttft for r in results if r.ttft is not None]
        lats = [r.latency for r in completed]
        tokens = sum(r.tokens for r in results if not r.problems)

        print(f"model: {model_desc}")
        print(f"requests: {len(results)}  completed: {len(completed)}  disconnected: {len(disconnected)}  "
              f"failed/malformed: {len(broken)}")
        print(f"5xx responses: {n5xx} (clients), {srv5xx} (server's qwenkit_requests_total)")
        print(f"time to first token: p50 {pct(ttfts, .5):.3f} s  p95 {pct(ttfts, .95):.3f} s")
        print(f"latency (completed): p50 {pct(lats, .5):.3f} s  p95 {pct(lats, .95):.3f} s")
        print(f"tokens: {tokens} in {wall:.2f} s -> {tokens / wall if wall else 0:.1f} tok/s aggregate")
        print(f"KV blocks in use after settle: {in_use if in_use is None else int(in_use)} "
              f"of {total_blocks if total_blocks is None else int(total_blocks)}")
        for line in hostile_report:
            print(line)
        print(f"server stopped on SIGTERM: {'yes' if stopped else 'no'} (exit code {code}, "
              f"uvicorn 'Finished server process': {'yes' if graceful else 'no'})")

        for r in broken[:5]:
            failures.append(f"client {r.index}: {'; '.join(r.problems[:3])}")
        if len(broken) > 5:
            failures.append(f"... and {len(broken) - 5} more failed clients")
        if n5xx or srv5xx:
            failures.append(f"{max(n5xx, srv5xx)} 5xx responses")
        expected_completed = args.clients - args.clients // 4
        if results and len(completed) != expected_completed:
            failures.append(f"{len(completed)} completed streams, expected {expected_completed}")
        if results and in_use != 0:
            failures.append(f"KV pool not back to full: {in_use} blocks in use after {args.settle:g} s")
        if failures:
            print("FAILED:", *failures, sep="\n  ")
            tail = log_path.read_text(errors="replace").splitlines()[-30:]
            print("server log (tail):", *tail, sep="\n  ")
            return 1
        print("OK: no 5xx, all completed streams well formed, KV pool back to full, server stopped")
        return 0


if __name__ == "__main__":
    sys.exit(main())
