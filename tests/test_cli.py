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


@pytest.fixture
def empty_store(tmp_path, monkeypatch):
    """No models on this machine: an empty qwenkit home and Hugging Face cache, offline."""
    from qwenkit import hub

    monkeypatch.setenv("QWENKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(hub, "hub_cache", lambda: tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


LONG_NAME = "a" * 5000  # past any file system's limit on a name (ENAMETOOLONG)


@pytest.mark.parametrize("argv", [
    ["show", LONG_NAME], ["show", "/" + LONG_NAME], ["show", "~/" + LONG_NAME], ["show", "qwen3:" + LONG_NAME],
    ["rm", LONG_NAME], ["run", "--model", LONG_NAME, "hi"], ["run", "--model", "./" + LONG_NAME, "hi"],
    ["bench", "--model", LONG_NAME], ["chat", "--model", LONG_NAME],
])
def test_a_name_too_long_for_a_path_is_one_error_line(empty_store, argv, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err[:300]


def write_gguf_with_alignment(path: Path, alignment: int) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_uint32(gguf.Keys.General.ALIGNMENT, alignment)  # the key only: the writer pads to 32
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("alignment", [0, 24])
def test_a_gguf_whose_alignment_is_not_a_power_of_two_is_refused(empty_store, tmp_path, alignment, capsys):
    path = write_gguf_with_alignment(tmp_path / "odd.gguf", alignment)
    for argv in (["show", str(path)], ["run", "--model", str(path), "hi"]):
        assert main(argv) == 1
        lines = capsys.readouterr().err.splitlines()  # `run` says "loading model" first
        assert lines[-1] == f"error: {path}: corrupt GGUF header: general.alignment is {alignment}, not a power of two"
        assert len(lines) == (2 if argv[0] == "run" else 1), lines


def test_commands_that_read_files_answer_without_torch(tmp_path):
    """--help, --version, list, show, rm, pull, argument errors and a wrong model path (serve's
    comes after its server, and torch, are imported: it warns first about an exposed host): no
    torch, no transformers, and each well under a second on an idle machine (asserted loosely)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hub_cache import write_tiny_gguf

    from qwenkit.default_model import DEFAULT_MODEL_NAME

    (tmp_path / "home" / "models").mkdir(parents=True)
    gguf = write_tiny_gguf(tmp_path / "home" / "models" / f"{DEFAULT_MODEL_NAME}.gguf", tokens=["a", "b"],
                           chat_template=None)
    (tmp_path / "notes").mkdir()
    commands = [
        ["--help"], ["--version"], ["list"], ["list", "--json"], ["show", "default"], ["show", str(gguf), "--json"],
        ["rm", "qwen3:0.6b"], ["pull"], ["pull", "qwen3:7b"], ["run", "--bogus"], ["serve", "--port", "x"],
        ["run", "--threads", "0", "hi"], ["run", "--model", str(tmp_path / "nope.gguf"), "hi"],
        *([cmd, "--model", str(tmp_path / "notes")] for cmd in ("run", "chat", "bench")),
        ["rm", "default"],
    ]
    script = f"""
import contextlib, io, json, sys, time
from qwenkit.cli import main
seen = []
for argv in {commands!r}:
    begun = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    seen.append([argv, code, time.perf_counter() - begun, [m for m in ("torch", "transformers") if m in sys.modules]])
print(json.dumps(seen))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QWENKIT_HOME": str(tmp_path / "home"),
           "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    for argv, code, seconds, heavy in json.loads(r.stdout):
        assert heavy == [], (argv, heavy)
        assert code == (0 if argv[0] in ("--help", "--version", "list", "show") or argv == ["rm", "default"]
                        else 2 if argv in (["pull"], ["run", "--bogus"], ["serve", "--port", "x"]) else 1), argv
        assert seconds < 20, (argv, seconds)  # loose, for a loaded shared machine: ~0.1-0.4 s idle
    assert not gguf.exists()


def test_prompt_longer_than_context(tiny_model):
    r = qwenkit("run", "--model", str(tiny_model), "word " * 700)
    assert_one_line_error(r, "the prompt is", "context is 512 tokens")


def test_bad_sampling_value(tiny_model):
    assert_one_line_error(qwenkit("run", "--model", str(tiny_model), "--top-p", "2", "hi"), "--top-p", "<= 1", "got 2")


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


class Loaded(Exception):
    """Stops a command once it has built its engine's arguments."""


@pytest.mark.parametrize("device, expected", [("cuda", 256), ("cpu", 32)])
@pytest.mark.parametrize("command", [["serve"], ["bench", "--concurrency", "1,16"]])
def test_the_batch_size_default_is_the_engines_on_each_device(tiny_model, monkeypatch, command, device, expected):
    """serve and bench leave max_num_seqs to the engine (256 on CUDA, 32 on CPU), as the engine
    resolves it; only flags given, or bench's need for more streams, override it."""
    import qwenkit.async_llm
    import qwenkit.llm
    from qwenkit.engine.llm_engine import EngineArgs

    resolved = []

    def engine(model, **kwargs):  # what LLM / AsyncLLM do with the arguments, on a (mocked) device
        resolved.append(EngineArgs(max_num_seqs=kwargs.get("max_num_seqs")).resolved(torch.device(device)))
        raise Loaded

    monkeypatch.setattr(qwenkit.async_llm, "AsyncLLM", engine)
    monkeypatch.setattr(qwenkit.llm, "LLM", engine)
    monkeypatch.setattr(qwenkit.llm, "resolve_device", lambda spec: torch.device(device))
    with pytest.raises(Loaded):
        main([*command, "--model", str(tiny_model), "--device", device])
    with pytest.raises(Loaded):
        main([*command, "--model", str(tiny_model), "--device", device, "--max-num-seqs", "8"]
             if command == ["serve"] else [*command[:-1], "1,300", "--model", str(tiny_model)])
    assert [args.max_num_seqs for args in resolved] == [expected, 8 if command == ["serve"] else 300]


def test_threads_reach_the_engine(tiny_model, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["run", "--model", str(tiny_model), "--threads", "1", "--json", "--max-tokens", "2", "hi"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_version():
    r = qwenkit("--version")
    assert r.returncode == 0 and re.fullmatch(r"qwenkit \d+\.\d+\.\d+ \(torch .*, Python .*\)\n", r.stdout), r.stdout


@pytest.mark.slow  # over 10 s (a whole engine in subprocesses, or many of them)
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


@pytest.mark.slow  # over 10 s (a whole engine in subprocesses, or many of them)
def test_serve_says_how_to_reach_it(tiny_model, tmp_path):
    """Not on a terminal: plain lines while loading, then the URL, names, page and key once ready."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QWENKIT_HOME": str(tmp_path)}
    env.pop("QWENKIT_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "qwenkit", "serve", "--model", str(tiny_model), "--port", "0",
                             "--threads", "1"], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        lines = []
        while not any("API key" in line for line in lines):
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        # (A first run also says that it compiles the CPU kernels: that line is the kernels' own.)
        ours = [line.rstrip() for line in lines if line.startswith("qwenkit: ") and " compiling " not in line]
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
            f"qwenkit: running: {dtype} on cpu, 1 thread, {kernels.summary('cpu')}; speculative decoding: prompt "
            "lookup, up to 8 drafts a step (n-grams of 2-4 tokens)",
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
