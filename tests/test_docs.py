"""Every fenced Python and shell block of README.md and docs/*.md runs as a new user would
run it: a snippet that does not do what its text says is a failing test.

What is run, by the fence's language:
- ``python``: written to a file in a fresh folder and run with this Python, one process
  per block, so each block stands alone as a user would paste it;
- ``bash``, ``sh``, ``shell``: run with ``bash -e -o pipefail`` in a fresh folder, with
  this environment's ``qwenkit`` and ``python`` first on PATH; curl fails on an HTTP
  error status (``--fail-with-body`` in a curlrc), so a 404 is not a pass;
- anything else is not code and is not run: output listings use a ``text`` fence or a
  bare one, JSON a ``json`` fence.

A block that cannot run here is marked by an HTML comment on the line just before its
fence, ``<!-- docs-test: skip REASON -->``, REASON one of :data:`SKIP_REASONS`:
``install`` for setup commands (a venv, ``pip install``: CI runs them, since ``.ci/run``
runs the README's test command verbatim, which this module checks), ``network`` (Hub
downloads), ``gpu`` (a CUDA device), ``long`` (a measurement or test run of minutes).
Skipped blocks are still parsed: ``compile()`` for Python, ``bash -n`` for shell.
``<!-- docs-test: server -->`` marks a block that starts ``qwenkit serve`` and runs until
stopped: the test starts it on a free port, waits for its "ready" line and stops it.

The world the blocks see: one ``qwenkit serve`` for the module, started from the README's
server block (the default model, no API key, so any key a snippet sends is accepted) on a
free loopback port; ``127.0.0.1:8000`` and ``localhost:8000`` in every block are rewritten
to it. The Hub is offline (``HF_HUB_OFFLINE=1``) and its cache is a tmp folder holding a
tiny random ``Qwen/Qwen3-0.6B``, so ``qwenkit list`` / ``show`` / ``run --model
qwen3:0.6b`` have a model to work on; the qwenkit home is a tmp folder that links the
assembled default model and the built kernels. Running blocks load the model: ``slow``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hub_cache import add_folder

# The blocks of a page run in order, later ones using what earlier ones started or wrote:
# under pytest-xdist they all go to one worker (--dist loadgroup, pyproject.toml).
pytestmark = pytest.mark.xdist_group("docs")

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_REASONS = ("install", "network", "gpu", "long")
PYTHON, SHELL = ("python", "py"), ("bash", "sh", "shell")
BLOCK_TIMEOUT_S = 900

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(.*?)\s*-->\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    marker: str | None  # the docs-test comment's text, e.g. "skip network", "server"

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self) -> str | None:
        return "python" if self.language in PYTHON else "shell" if self.language in SHELL else None

    @property
    def skip_reason(self) -> str | None:
        if self.marker and self.marker.startswith("skip"):
            return self.marker.removeprefix("skip").strip()
        return None


def fenced_blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, language = opening.groups()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence[0] * len(fence)):
            end += 1
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.search(previous)
        code = "\n".join(line.removeprefix(indent) for line in lines[i + 1:end]) + "\n"
        blocks.append(Block(path, i + 1, language.lower(), code, marker[1] if marker else None))
        i = end + 1
    return blocks


BLOCKS = [b for path in DOCS for b in fenced_blocks(path)]
CODE = [b for b in BLOCKS if b.kind]
RUN = [b for b in CODE if b.skip_reason is None and b.marker != "server"]
SERVERS = [b for b in CODE if b.marker == "server"]


# -- checks that need no model --------------------------------------------------------------


def test_markers_are_known():
    for block in BLOCKS:
        if block.marker is not None:
            assert block.marker == "server" or block.skip_reason in SKIP_REASONS, (block.id, block.marker)
            assert block.kind, f"{block.id}: a docs-test marker on a block that is not run anyway"
    for path in DOCS:
        marked = len(_MARKER.findall(path.read_text(encoding="utf-8")))
        assert marked == sum(1 for b in BLOCKS if b.path == path and b.marker), f"{path}: a marker not before a fence"


@pytest.mark.parametrize("block", CODE, ids=lambda b: b.id)
def test_block_parses(block):
    if block.kind == "python":
        compile(block.code, block.id, "exec")
    else:
        r = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True)
        assert r.returncode == 0, f"{block.id}: {r.stderr}"


def test_ci_runs_the_readme_test_command():
    """.ci/run ends with the README's test command, verbatim: the documented command is CI's."""
    readme = [b for b in BLOCKS if b.path.name == "README.md" and "pytest" in b.code and b.skip_reason == "install"]
    full = [b for b in readme if "not slow" not in b.code]
    assert len(full) == 1, [b.id for b in readme]
    command = full[0].code.strip()
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == command


def test_model_names_in_snippets_are_served():
    """A request's model name is the default server's, or a short name it loads (not 'qwen3')."""
    served = {"Qwen2.5-Coder-0.5B-Instruct-Q4_K_M", "default"}  # the alias of the served model
    for block in CODE:
        for name in re.findall(r'"model":\s*"([^"]+)"|model="([^"]+)"', block.code):
            name = next(n for n in name if n)
            assert name in served, f"{block.id}: model {name!r} is not what the default server serves"


# -- the world the blocks run in ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, default_gguf, tiny_checkpoint):
    """The environment every block runs in (see the module docstring)."""
    home = tmp_path_factory.mktemp("qwenkit-home")
    (home / "models").mkdir()
    for path in (default_gguf, default_gguf.with_name(default_gguf.name + ".sha256")):
        (home / "models" / path.name).symlink_to(path)
    kernels = default_gguf.parent.parent / "kernels"
    if kernels.is_dir():
        (home / "kernels").symlink_to(kernels)
    cache = tmp_path_factory.mktemp("hf-hub")
    add_folder(cache, "Qwen/Qwen3-0.6B", tiny_checkpoint)
    curl_home = tmp_path_factory.mktemp("curl")
    (curl_home / ".curlrc").write_text("--fail-with-body\n--silent\n--show-error\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "QWENKIT_HOME": str(home),
           "CURL_HOME": str(curl_home), "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("QWENKIT_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL", "DASHSCOPE_API_KEY"):
        env.pop(name, None)
    return env


class Server:
    """A server block running in the background, its output collected."""

    def __init__(self, block: Block, env: dict[str, str], cwd: Path):
        self.port = free_port()
        command = re.sub(r"--port\s+8000\b", f"--port {self.port}", block.code)
        assert str(self.port) in command, f"{block.id}: a server block must say --port 8000"
        self.output: list[str] = []
        self.proc = subprocess.Popen(["bash", "-e", "-c", command], env=env, cwd=cwd, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)

    def wait_ready(self, timeout: float = BLOCK_TIMEOUT_S) -> str:
        deadline = time.time() + timeout
        while not any(f"ready at http://127.0.0.1:{self.port}" in line for line in self.output):
            assert self.proc.poll() is None, "".join(self.output)
            assert time.time() < deadline, "the server did not start:\n" + "".join(self.output)
            time.sleep(0.2)
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _normalized(code: str) -> str:
    return re.sub(r"#.*", "", code).split()


MODULE_SERVER = next((b for b in SERVERS if b.path.name == "README.md"), None)


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    """The README's `qwenkit serve` block, running: "host:port"."""
    assert MODULE_SERVER is not None, "the README has no docs-test server block"
    running = Server(MODULE_SERVER, world, tmp_path_factory.mktemp("server"))
    try:
        yield running.wait_ready()
    finally:
        running.stop()


def run_block(block: Block, world: dict[str, str], address: str, cwd: Path) -> subprocess.CompletedProcess:
    code = re.sub(r"(127\.0\.0\.1|localhost):8000\b", address, block.code)
    if block.kind == "python":
        (cwd / "snippet.py").write_text(code)
        command = [sys.executable, "snippet.py"]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", code]
    return subprocess.run(command, env=world, cwd=cwd, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN, ids=lambda b: b.id)
def test_block_runs(block, world, server, tmp_path):
    r = run_block(block, world, server, tmp_path)
    print(r.stdout)  # shown with -rP: what a user would see
    assert r.returncode == 0, f"{block.id} failed:\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("block", SERVERS, ids=lambda b: b.id)
def test_server_block_starts(block, world, server, tmp_path):
    """A `qwenkit serve` block starts and says it is ready (the README's is the module's server)."""
    import httpx

    if _normalized(block.code) == _normalized(MODULE_SERVER.code):
        address = server
    else:
        running = Server(block, world, tmp_path)
        try:
            address = running.wait_ready()
            assert httpx.get(f"http://{address}/health").status_code == 200
        finally:
            running.stop()
        return
    assert httpx.get(f"http://{address}/health").status_code == 200
