import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels (qwenkit/kernels/cuda) run under Triton's interpreter on
# CPU tensors; it is read when a kernel is defined, so it is set before any import of them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Fixtures that read the default model: their tests are `slow`, out of the quick subset
# (tokenizer_pair reaches it through getfixturevalue, which pytest's closure cannot see).
_DEFAULT_MODEL_FIXTURES = {"default_gguf", "hf_gguf_tokenizer", "tokenizer_pair"}


def pytest_collection_modifyitems(items):
    for item in items:
        if _DEFAULT_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The embedded default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M), assembled once.

    Skips when the `default-model` extra is not installed, unless
    QWENKIT_REQUIRE_DEFAULT_MODEL=1 (CI sets it), where a missing model fails.
    """
    from qwenkit.default_model import DefaultModelMissing, default_model_path

    try:
        return default_model_path(progress=False)
    except DefaultModelMissing as e:
        if os.environ.get("QWENKIT_REQUIRE_DEFAULT_MODEL") == "1":
            raise
        pytest.skip(f"default model not installed: {e}")


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(default_gguf):
    """transformers' own tokenizer built from the default GGUF (slow to build: shared)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


# -- the tiny model, built once per test run ---------------------------------------------


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Tiny random checkpoints (tests/tiny.py), each built once per test run:
    ``tiny_checkpoints("qwen2", max_len=1024)`` is its folder. Shared, so read-only: a
    test that changes a file (a chat template) works on a copy."""
    from tiny import make_checkpoint

    built: dict[tuple, Path] = {}

    def checkpoint(arch: str = "qwen3", **options) -> Path:
        key = (arch, tuple(sorted(options.items())))
        if key not in built:
            folder = tmp_path_factory.mktemp(arch)
            make_checkpoint(folder, arch, **options)
            built[key] = folder
        return built[key]

    return checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoints) -> Path:
    """The tiny Qwen3 the chat, client and server tests talk to (a 2048-token context:
    room for three tools' schemas)."""
    return tiny_checkpoints("qwen3", max_len=2048)


@pytest.fixture(scope="session")
def llm(tiny_checkpoint):
    """`LLM` on the tiny Qwen3 (float32). Shared: a test that patches it restores it."""
    from qwenkit import LLM

    return LLM(str(tiny_checkpoint), dtype="float32", progress=False)


@pytest.fixture(scope="session")
def allm(tiny_checkpoint):
    """`AsyncLLM` on the tiny Qwen3 (float32), its engine thread running for the whole run.
    Shared: a test leaves it idle (no request running) and unpatched."""
    from qwenkit import AsyncLLM

    engine = AsyncLLM(str(tiny_checkpoint), dtype="float32", progress=False)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server_config():
    """How `server` is configured: a module overrides this fixture for its own config."""
    from qwenkit.server import ServerConfig

    return ServerConfig()


@pytest.fixture(scope="module")
def server(allm, server_config) -> str:
    """A real server on `allm`, on a free loopback port, for one test module: its base URL."""
    from serving import running_server

    with running_server(allm, server_config) as url:
        yield url
