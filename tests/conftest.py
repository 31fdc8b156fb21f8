import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels (qwenkit/kernels/cuda) run under Triton's interpreter on
# CPU tensors; it is read when a kernel is defined, so it is set before any import of them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Fixtures that read the default model: their tests are `slow`, out of the quick subset.
_DEFAULT_MODEL_FIXTURES = {"default_gguf", "hf_gguf_tokenizer"}


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
