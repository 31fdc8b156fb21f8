"""What --model resolves to; no test reaches the network."""

import socket
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

from qwenkit import model_files
from qwenkit.default_model import DEFAULT_MODEL_NAME
from qwenkit.errors import ModelLoadError
from qwenkit.model_files import HF_ALLOW_PATTERNS, ModelFiles, resolve_model

REPO_ID = "Qwen/Qwen3-0.6B"


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Fails any connection attempt, and points every cache at tmp_path."""

    def refuse(*args, **kwargs):
        raise AssertionError("test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("QWENKIT_HOME", str(tmp_path / "qwenkit-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    # huggingface_hub reads these at import; set what it actually uses.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def _gguf(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF\x03\x00\x00\x00")
    return path


def _hf_folder(folder: Path, *, weights: str = "model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    (folder / weights).write_bytes(b"\0" * 8)
    return folder


def _message(spec, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as info:
        resolve_model(spec, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("spec", [None, "default"])
def test_default(spec, tmp_path, monkeypatch):
    calls = []
    gguf = tmp_path / "default.gguf"
    monkeypatch.setattr(model_files, "default_model_path", lambda *, progress: calls.append(progress) or gguf)
    assert resolve_model(spec, progress=False) == ModelFiles("gguf", gguf, DEFAULT_MODEL_NAME)
    assert calls == [False]


def test_gguf_file(tmp_path):
    path = _gguf(tmp_path / "Qwen3-0.6B-Q8_0.gguf")
    assert resolve_model(str(path)) == ModelFiles("gguf", path, "Qwen3-0.6B-Q8_0")


def test_gguf_file_with_bad_magic(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"<html>")
    assert "not a GGUF file" in _message(str(path))


def test_other_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hi")
    assert _message(str(path)) == f"{path} is not a .gguf file: pass a .gguf file or a model folder"
    config = _hf_folder(tmp_path / "m") / "config.json"
    assert "pass its folder" in _message(str(config))


def test_hf_folder(tmp_path):
    folder = _hf_folder(tmp_path / "Qwen3-0.6B")
    assert resolve_model(str(folder)) == ModelFiles("hf", folder, "Qwen3-0.6B")


def test_hf_folder_wins_over_gguf(tmp_path):
    folder = _hf_folder(tmp_path / "m")
    _gguf(folder / "m.gguf")
    assert resolve_model(str(folder)).format == "hf"


def test_hf_folder_without_safetensors(tmp_path):
    folder = _hf_folder(tmp_path / "m", weights="pytorch_model.bin")
    message = _message(str(folder))
    assert message.startswith(f"no *.safetensors weights in {folder}")
    assert ".bin" in message and "not supported" in message


def test_folder_with_one_gguf(tmp_path):
    path = _gguf(tmp_path / "m" / "model-q4.gguf")
    assert resolve_model(str(tmp_path / "m")) == ModelFiles("gguf", path, "model-q4")


def test_folder_with_several_ggufs(tmp_path):
    _gguf(tmp_path / "m" / "a.gguf")
    _gguf(tmp_path / "m" / "b.gguf")
    message = _message(str(tmp_path / "m"))
    assert "2 .gguf files (a.gguf, b.gguf)" in message and "pass one of them" in message


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    assert _message(str(tmp_path / "empty")) == (
        f"{tmp_path / 'empty'} is not a model folder: "
        "expected config.json and *.safetensors, or a .gguf file"
    )


def test_relative_and_home_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    path = _gguf(tmp_path / "models" / "x.gguf")
    assert resolve_model("./models/x.gguf").path == Path("models/x.gguf")
    assert resolve_model("~/models/x.gguf").path == path
    # An existing folder that happens to look like a repo id is a folder.
    folder = _hf_folder(tmp_path / "Qwen" / "Qwen3-0.6B")
    assert resolve_model("Qwen/Qwen3-0.6B") == ModelFiles("hf", Path("Qwen/Qwen3-0.6B"), "Qwen3-0.6B")
    assert folder.exists()


@pytest.mark.parametrize(
    "spec", ["./missing", "../missing", "/no/such/model", "~/no-such-qwenkit-model", "missing.gguf", "a/b/c"]
)
def test_missing_path(spec):
    assert _message(spec).startswith("model path not found: ")


@pytest.mark.parametrize("spec", ["foo", "", "owner/", "a b/c"])
def test_unknown_model(spec):
    assert _message(spec) == (
        f"unknown model {spec!r}: pass 'default', a short name (qwen3:8b), a folder, a .gguf file, "
        "or a Hugging Face repo id (owner/name)"
    )


def test_repo_offline_not_cached(offline):
    message = _message(REPO_ID)
    assert "is not on this machine" in message
    assert "HF_HUB_OFFLINE" in message and f"qwenkit pull {REPO_ID}" in message


def test_repo_offline_from_cache(offline, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-home" / "hub" / "models--Qwen--Qwen3-0.6B"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = _hf_folder(repo / "snapshots" / commit)
    files = resolve_model(REPO_ID, progress=False)
    assert files == ModelFiles("hf", snapshot, REPO_ID)
    # The same folder passed by path is named after its repo too.
    assert resolve_model(str(snapshot)).name == REPO_ID


def _fake_snapshot_download(monkeypatch, result):
    calls = []

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if isinstance(result, BaseException):
            raise result
        return str(result)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


def test_repo_download(tmp_path, monkeypatch):
    folder = _hf_folder(tmp_path / "snap")
    calls = _fake_snapshot_download(monkeypatch, folder)
    assert resolve_model(REPO_ID) == ModelFiles("hf", folder, REPO_ID)
    assert calls == [(REPO_ID, {"allow_patterns": HF_ALLOW_PATTERNS})]
    assert "*.safetensors" in HF_ALLOW_PATTERNS and "config.json" in HF_ALLOW_PATTERNS


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{REPO_ID}"))


def test_repo_not_found(monkeypatch):
    _fake_snapshot_download(monkeypatch, hf_errors.RepositoryNotFoundError("404", response=_response(404)))
    assert _message(REPO_ID).startswith(f"no Hugging Face repo {REPO_ID}")


def test_repo_gated(monkeypatch):
    _fake_snapshot_download(monkeypatch, hf_errors.GatedRepoError("403", response=_response(403)))
    assert "is gated" in _message(REPO_ID)


@pytest.mark.parametrize(
    "error",
    [
        hf_errors.LocalEntryNotFoundError("connection error and nothing cached"),
        httpx2.ConnectError("unreachable"),
        ConnectionError("unreachable"),
        hf_errors.HfHubHTTPError("503", response=_response(503)),
    ],
)
def test_repo_unreachable(error, monkeypatch):
    _fake_snapshot_download(monkeypatch, error)
    message = _message(REPO_ID)
    assert message.startswith(f"cannot download {REPO_ID} from Hugging Face (offline?")
    assert f"qwenkit pull {REPO_ID}" in message and "HF_HUB_OFFLINE=1" in message


def test_gguf_only_repo(tmp_path, monkeypatch):
    (tmp_path / "snap").mkdir()
    _fake_snapshot_download(monkeypatch, tmp_path / "snap")
    message = _message("Qwen/Qwen3-0.6B-GGUF")
    assert "has no config.json" in message and "qwenkit pull Qwen/Qwen3-0.6B-GGUF FILE.gguf" in message
