"""`qwenkit run`: output shapes, and one-line errors (never a traceback) for bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwenkit.cli import main

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoints) -> Path:
    return tiny_checkpoints("qwen3")


def qwenkit(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "qwenkit", *args], capture_output=True, text=True, env=env, input=stdin, timeout=300
    )


def test_run_json(tiny_model, capsys):
    assert main(["run", "--model", str(tiny_model), "--json", "--temperature", "0", "--max-tokens", "8", "Hello"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"reasoning_content", "content", "finish_reason", "usage"}
    assert out["finish_reason"] in ("stop", "length")
    assert out["usage"]["completion_tokens"] <= 8
    assert out["usage"]["prompt_tokens"] > 5


def test_run_streams_the_same_answer(tiny_model, capsys):
    args = ["run", "--model", str(tiny_model), "--temperature", "0", "--max-tokens", "8", "--no-think", "Hello"]
    assert main([*args, "--json"]) == 0
    content = json.loads(capsys.readouterr().out)["content"]
    assert main(args) == 0
    assert capsys.readouterr().out == content + "\n"


def test_run_reads_stdin(tiny_model):
    r = qwenkit("run", "--model", str(tiny_model), "--json", "--max-tokens", "4", stdin="Hello")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["usage"]["completion_tokens"] <= 4


def assert_one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_missing_path(tmp_path):
    assert_one_line_error(qwenkit("run", "--model", str(tmp_path / "nope.gguf"), "hi"), "not found")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    assert_one_line_error(qwenkit("run", "--model", str(tmp_path), "hi"), "is not a model folder")


def test_unsupported_architecture(tiny_model, tmp_path):
    for f in tiny_model.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_one_line_error(qwenkit("run", "--model", str(tmp_path), "hi"), "unsupported model_type 'llama'")


@pytest.mark.parametrize("file, edit, fragments", [
    ("config.json", lambda c: [c], ("config.json", "expected a JSON object, got an array")),
    ("config.json", lambda c: {**c, "architectures": "Qwen3ForCausalLM"}, ("architectures must be an array of strings",)),
    ("config.json", lambda c: {**c, "model_type": "llama", "architectures": "LlamaForCausalLM"},
     ("architectures must be an array of strings",)),
    ("config.json", lambda c: {**c, "hidden_size": "64"}, ("hidden_size must be an integer, got a string",)),
    ("config.json", lambda c: {**c, "num_hidden_layers": 0}, ("num_hidden_layers must be at least 1",)),
    ("config.json", lambda c: {**c, "tie_word_embeddings": "no"}, ("tie_word_embeddings must be true or false",)),
    ("config.json", lambda c: {**c, "rope_scaling": "yarn"}, ("rope_scaling must be an object",)),
    ("generation_config.json", lambda c: {**c, "eos_token_id": "2"}, ("eos_token_id must be an array of integers",)),
    ("generation_config.json", lambda c: "x", ("generation_config.json", "expected a JSON object, got a string")),
])
def test_a_config_with_a_mistyped_value_is_one_error_line(tiny_model, tmp_path, file, edit, fragments):
    for f in tiny_model.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / file).read_text())
    (tmp_path / file).write_text(json.dumps(edit(config)))
    assert_one_line_error(qwenkit("run", "--model", str(tmp_path), "hi"), *fragments)


def test_truncated_gguf(default_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(default_gguf, "rb") as src:
        cut.write_bytes(src.read(20_000_000))
    assert_one_line_error(qwenkit("run", "--model", str(cut), "hi"), "cut.gguf", "truncated")


def test_prompt_longer_than_context(tiny_model):
    r = qwenkit("run", "--model", str(tiny_model), "word " * 700)
    assert_one_line_error(r, "the prompt is", "context is 512 tokens")


def test_bad_sampling_value(tiny_model):
    assert_one_line_error(qwenkit("run", "--model", str(tiny_model), "--top-p", "2", "hi"), "top_p")


@pytest.mark.slow
def test_default_model_answers_a_question(default_gguf):
    r = qwenkit("run", "--json", "--temperature", "0", "--max-tokens", "24", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "Paris" in out["content"]
    assert out["reasoning_content"] is None


def test_bench_runs_on_a_tiny_model(tiny_model, capsys):
    args = ["bench", "--model", str(tiny_model), "--dtype", "float32", "--prompt-tokens", "64",
            "--decode-tokens", "4", "--concurrency", "1,2", "--repeats", "2", "--threads", "1"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [d["concurrency"] for d in out["decode"]] == [1, 2]
    assert out["threads"] == 1 and out["repeats"] == 2
    for figure in (out["prefill_tok_s"], out["ttft_cached_s"], *[d["aggregate_tok_s"] for d in out["decode"]]):
        assert len(figure["runs"]) == 2 and figure["min"] <= figure["median"] <= figure["max"]
        assert figure["min"] > 0
    assert out["peak_rss_mb"] > 0
    from qwenkit import kernels

    assert out["kernels"] == kernels.summary("cpu")  # which kernel variants ran
    assert main(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert "each figure: median of 2 runs (min, max)" in table[0] and "threads 1" in table[0]
    assert table[1].startswith("prefill, 64-token prompt: ") and "(min " in table[1]
    assert re.fullmatch(r"time to first token, same prompt prefix cached: .* s \(\d+% of the uncached time\)",
                        table[3]), table[3]
    assert table[4] == "decode, 4 tokens per stream (tok/s):"
    assert table[5].split() == ["streams", "all", "streams", "together", "per", "stream"]
    assert table[-1].startswith("peak memory (RSS): ")


def test_bench_checks_its_options(tiny_model):
    assert_one_line_error(qwenkit("bench", "--model", str(tiny_model), "--repeats", "0"), "--repeats")


def test_version():
    r = qwenkit("--version")
    assert r.returncode == 0 and re.fullmatch(r"qwenkit \d+\.\d+\.\d+ \(torch .*, Python .*\)\n", r.stdout), r.stdout


def test_run_without_a_prompt_on_a_terminal_starts_the_chat(tiny_model, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QWENKIT_HOME": str(tmp_path)}
    child = pexpect.spawn(sys.executable, ["-m", "qwenkit", "run", "--model", str(tiny_model)], env=env,
                          encoding="utf-8", timeout=120)
    child.expect("no prompt given: starting the interactive chat")
    child.expect("new conversation")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_serve_says_how_to_reach_it(tiny_model, tmp_path):
    """Not on a terminal: plain lines while loading, then the URL, names, page and key once ready."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QWENKIT_HOME": str(tmp_path)}
    env.pop("QWENKIT_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "qwenkit", "serve", "--model", str(tiny_model), "--port", "0"],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        lines = []
        while not any("API key" in line for line in lines):
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        ours = [line.rstrip() for line in lines if line.startswith("qwenkit: ")]
        assert ours[0] == f"qwenkit: loading model {tiny_model} (the first load of a model takes longest)"
        assert re.fullmatch(rf"qwenkit: loaded {tiny_model.name} in \d+\.\d s", ours[1])
        port = int(re.fullmatch(r"qwenkit: ready at http://127\.0\.0\.1:(\d+): OpenAI API "
                                r"http://127\.0\.0\.1:\1/v1, DashScope API http://127\.0\.0\.1:\1/api/v1", ours[2])[1])
        from qwenkit import kernels
        from qwenkit.llm import resolve_dtype

        dtype = str(resolve_dtype(None, torch.device("cpu"))).removeprefix("torch.")
        assert ours[3:] == [
            f"qwenkit: model name for requests: {tiny_model.name}, default (capabilities: completion, thinking, "
            "hybrid_thinking, tools)",
            f"qwenkit: running: {dtype} on cpu, {kernels.summary('cpu')}",
            f"qwenkit: web chat page: http://127.0.0.1:{port}/",
            "qwenkit: API key: none required (--api-key or QWENKIT_API_KEY sets one)",
        ]
        import httpx

        assert [m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]] == [
            tiny_model.name, "default"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_serve_banner():
    from qwenkit.cli import serve_banner
    from qwenkit.server import ServerConfig

    lines = serve_banner(ServerConfig(served_model_names=["Qwen/Qwen3-8B", "qwen3:8b"], api_key="k", web=False),
                         host="0.0.0.0", port=8000, capabilities=["completion"])
    assert lines == [
        "ready at http://127.0.0.1:8000 (listening on all interfaces): OpenAI API http://127.0.0.1:8000/v1, "
        "DashScope API http://127.0.0.1:8000/api/v1",
        "model name for requests: Qwen/Qwen3-8B, qwen3:8b, default (capabilities: completion)",
        "web chat page: off (--no-web)",
        "API key: required (Authorization: Bearer KEY)",
    ]
    assert serve_banner(ServerConfig(served_model_names=["m"]), host="::1", port=1,
                        capabilities=["completion"])[0].startswith("ready at http://[::1]:1: ")
