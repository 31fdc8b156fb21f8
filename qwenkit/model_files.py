"""What ``--model`` names: the default model, a local folder or .gguf file, or a Hub repo."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qwenkit.default_model import DEFAULT_MODEL_NAME, default_model_path
from qwenkit.errors import ModelLoadError
from qwenkit.model_names import HubModel, is_short_name, lookup

# What a Hugging Face checkpoint needs; everything else in a repo (other formats,
# READMEs, training files) stays on the Hub.
HF_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    # a vision-language checkpoint's image processor and its (multimodal) chat template
    "preprocessor_config.json",
    "chat_template.json",
    # sentence-transformers' pooling config: how an embedding model (Qwen3-Embedding) is told apart
    "modules.json",
    "1_Pooling/config.json",
]

_GGUF_MAGIC = b"GGUF"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")
# owner/name/file.gguf: one GGUF file of a Hub repo, as `qwenkit pull owner/name file.gguf` fetches it.
_REPO_FILE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+)/([^/\\]+\.gguf)", re.IGNORECASE)
# <cache>/models--owner--name/snapshots/<commit>: a folder from the Hugging Face cache.
_HF_CACHE_FOLDER = re.compile(r"models--(.+?)--(.+)")


@dataclass(frozen=True)
class ModelFiles:
    """A model's files on disk, as found from ``--model``."""

    format: Literal["hf", "gguf"]
    path: Path  # the HF folder (config.json + *.safetensors), or the .gguf file
    name: str  # for display: folder/file stem, repo id, or DEFAULT_MODEL_NAME


def resolve_model(spec: str | None, *, progress: bool = True) -> ModelFiles:
    """Find the files ``spec`` names, downloading or assembling them if needed.

    ``spec`` is None or ``"default"`` (the embedded default model, also by its own name
    :data:`~qwenkit.default_model.DEFAULT_MODEL_NAME`), a .gguf file, a
    folder with config.json and *.safetensors (or a single .gguf), a Hugging Face
    repo id ``owner/name`` or one GGUF file of a repo, ``owner/name/file.gguf``
    (downloaded into the HF cache; with ``HF_HUB_OFFLINE=1`` taken from the cache
    only), or a short name such as ``qwen3:8b`` or ``qwen3:8b-q4_k_m``
    (:mod:`qwenkit.model_names`). ``progress`` shows progress bars on stderr.
    Raises :class:`ModelLoadError` with a message that says what to do.
    """
    if spec is None or spec in ("default", DEFAULT_MODEL_NAME):
        return ModelFiles("gguf", default_model_path(progress=progress), DEFAULT_MODEL_NAME)
    if not spec.strip():
        raise ModelLoadError(_unknown_model_message(spec))
    path = local_path(spec)
    if path is not None:
        return _resolve_folder(path) if path.is_dir() else _resolve_file(path)
    repo_file = _REPO_FILE.fullmatch(spec)
    if repo_file and not spec.startswith((".", "~")):
        try:
            return resolve_repo_file(repo_file[1], repo_file[2], progress=progress)
        except ModelLoadError as e:
            raise ModelLoadError(f"model path not found: {spec}; as a Hugging Face file: {e}") from e
    if looks_like_path(spec):
        raise ModelLoadError(f"model path not found: {os.path.expanduser(spec)}")
    if _REPO_ID.fullmatch(spec):
        return _resolve_repo(spec, progress=progress)
    if is_short_name(spec):
        return resolve_short_name(spec, progress=progress)
    raise ModelLoadError(_unknown_model_message(spec))


def local_path(spec: str) -> Path | None:
    """The file or folder `spec` names on this machine, or None when there is none. A name
    no path can have (too long for the file system, a NUL byte) is none, not an OSError."""
    path = Path(spec).expanduser()
    try:
        return path if path.exists() else None
    except (OSError, ValueError):
        return None


def is_hub_name(spec: str) -> bool:
    """Whether `spec` is spelled like something `qwenkit pull` fetches: a short name, a repo
    id or owner/name/file.gguf."""
    return is_short_name(spec) or bool(_REPO_ID.fullmatch(spec) or _REPO_FILE.fullmatch(spec))


def _unknown_model_message(spec: str) -> str:
    return (
        f"unknown model {spec!r}: pass 'default', a short name (qwen3:8b), a folder, a .gguf file, "
        "or a Hugging Face repo id (owner/name)"
    )


def resolve_short_name(spec: str, *, progress: bool) -> ModelFiles:
    """A short name's files: its safetensors repo, or its GGUF file (from the cache, else the Hub)."""
    try:
        model = lookup(spec)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    if model.quantization is None:
        return _resolve_repo(model.repo_id, progress=progress, pull_name=model.name)
    cached = find_cached_gguf(model)
    if cached is not None:
        return _resolve_file(cached)
    filename = gguf_filename_on_hub(model)
    return resolve_repo_file(model.repo_id, filename, progress=progress, pull_name=model.name)


def cached_snapshots(repo_id: str) -> list[Path]:
    """The repo's snapshot folders in the local HF cache, the one `main` points to first."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
    try:
        main = (repo / "refs" / "main").read_text().strip()
    except OSError:
        main = None
    return sorted(snapshots, key=lambda p: p.name != main)


def find_cached_gguf(model: HubModel) -> Path | None:
    """The short name's GGUF file if a snapshot in the local HF cache has it."""
    for snapshot in cached_snapshots(model.repo_id):
        for path in sorted(snapshot.glob("*.gguf")):
            if model.is_its_file(path.name) and path.exists():
                return path
    return None


def gguf_filename_on_hub(model: HubModel) -> str:
    """The name of the GGUF file of `model`'s quantization in its repo, asked of the Hub."""
    import huggingface_hub
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_OFFLINE", False):
        raise ModelLoadError(_not_here_message(model.name, model.repo_id))
    try:
        files = huggingface_hub.HfApi().list_repo_files(model.repo_id)
    except _download_errors() as e:
        raise ModelLoadError(_cannot_download_message(model.repo_id, e, pull_name=model.name)) from e
    matches = [f for f in files if model.is_its_file(f) and "/" not in f]
    if len(matches) == 1:
        return matches[0]
    split = [f for f in files if model.quantization in f.lower() and f.lower().endswith(".gguf")]
    if split:
        raise ModelLoadError(
            f"{model.repo_id} has {model.quantization} only as a split GGUF ({split[0]}, ...): "
            "qwenkit reads single-file GGUFs; try another quantization or the safetensors repo"
        )
    raise ModelLoadError(f"{model.repo_id} has no {model.quantization} GGUF file (it has: "
                         + ", ".join(f for f in files if f.endswith(".gguf")) + ")")


def resolve_repo_file(repo_id: str, filename: str, *, progress: bool, pull_name: str | None = None) -> ModelFiles:
    """One GGUF file of a Hub repo, from the local HF cache or downloaded into it."""
    import huggingface_hub

    with _progress_bars(progress):
        try:
            path = huggingface_hub.hf_hub_download(repo_id, filename)
        except _download_errors() as e:
            if type(e).__name__ in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
                raise ModelLoadError(f"Hugging Face repo {repo_id} has no file {filename}") from e
            raise ModelLoadError(_hub_error_message(repo_id, e, pull_name or f"{repo_id} {filename}")) from e
    return _resolve_file(Path(path))


def looks_like_path(spec: str) -> bool:
    """Whether `spec` is spelled as a path (a folder or file), not as a name."""
    return (
        spec.startswith(("/", "~", "."))  # also ./ and ../; repo ids start alphanumeric
        or spec.lower().endswith(".gguf")
        or spec.count("/") > 1
        or "\\" in spec
        or Path(spec).is_absolute()
    )


def _resolve_file(path: Path) -> ModelFiles:
    if path.suffix.lower() != ".gguf":
        is_checkpoint_file = path.name == "config.json" or path.suffix == ".safetensors"
        hint = "pass its folder" if is_checkpoint_file else "pass a .gguf file or a model folder"
        raise ModelLoadError(f"{path} is not a .gguf file: {hint}")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_GGUF_MAGIC))
    except OSError as e:
        raise ModelLoadError(f"{path} cannot be read ({e.strerror})") from None
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with 'GGUF'): re-download it")
    return ModelFiles("gguf", path, path.stem)


def _resolve_folder(folder: Path) -> ModelFiles:
    if (folder / "config.json").is_file():
        if not any(folder.glob("*.safetensors")):
            raise ModelLoadError(
                f"no *.safetensors weights in {folder}: .bin / PyTorch checkpoints are not "
                "supported; use a safetensors checkpoint or a .gguf file"
            )
        return ModelFiles("hf", folder, _folder_display_name(folder))
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return _resolve_file(ggufs[0])
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ModelLoadError(f"{folder} holds {len(ggufs)} .gguf files ({names}): pass one of them with --model")
    raise ModelLoadError(
        f"{folder} is not a model folder: expected config.json and *.safetensors, or a .gguf file"
    )


def _folder_display_name(folder: Path) -> str:
    folder = folder.resolve()
    if folder.parent.name == "snapshots":
        match = _HF_CACHE_FOLDER.fullmatch(folder.parent.parent.name)
        if match:
            return f"{match[1]}/{match[2]}"
    return folder.name


@contextlib.contextmanager
def _progress_bars(progress: bool) -> Iterator[None]:
    """huggingface_hub's download bars on stderr, or none."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    silence = not progress and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        yield
    finally:
        if silence:
            enable_progress_bars()


def _resolve_repo(repo_id: str, *, progress: bool, pull_name: str | None = None) -> ModelFiles:
    folder = download_repo(repo_id, progress=progress, pull_name=pull_name)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"Hugging Face repo {repo_id} has no config.json (a GGUF-only repo?): fetch one of its files "
            f"with `qwenkit pull {repo_id} FILE.gguf` and pass {repo_id}/FILE.gguf with --model"
        )
    files = _resolve_folder(folder)
    return ModelFiles(files.format, files.path, repo_id)


def download_repo(repo_id: str, *, progress: bool, pull_name: str | None = None) -> Path:
    """The repo's checkpoint files (HF_ALLOW_PATTERNS) in the local HF cache, downloading
    what is missing; an interrupted download resumes where it stopped."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    with _progress_bars(progress):
        try:
            return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HF_ALLOW_PATTERNS))
        except hf_errors.HFValidationError as e:
            raise ModelLoadError(_unknown_model_message(repo_id)) from e
        except _download_errors() as e:
            raise ModelLoadError(_hub_error_message(repo_id, e, pull_name or repo_id)) from e


def _hub_error_message(repo_id: str, error: BaseException, pull_name: str) -> str:
    from huggingface_hub import errors as hf_errors

    if isinstance(error, hf_errors.GatedRepoError):  # a RepositoryNotFoundError, so first
        return (
            f"Hugging Face repo {repo_id} is gated: accept its terms on "
            f"https://huggingface.co/{repo_id} and log in with `hf auth login`"
        )
    if isinstance(error, hf_errors.RepositoryNotFoundError):
        return f"no Hugging Face repo {repo_id} (if it is private, log in with `hf auth login`)"
    return _cannot_download_message(repo_id, error, pull_name=pull_name)


def _download_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors as hf_errors

    # OSError covers requests' errors, OfflineModeIsEnabled (a ConnectionError) and
    # LocalEntryNotFoundError (a FileNotFoundError); httpx's are not OSErrors. Look them up
    # only if huggingface_hub already imported them: which client it uses varies by version.
    errors: list[type[BaseException]] = [OSError, hf_errors.HfHubHTTPError]
    for client in ("httpx2", "httpx"):
        module = sys.modules.get(client)
        if module is not None and hasattr(module, "TransportError"):
            errors.append(module.TransportError)
    return tuple(errors)


def _not_here_message(name: str, repo_id: str, *, incomplete: bool = False) -> str:
    state = "is incomplete on" if incomplete else "is not on"
    about = name if name == repo_id else f"{name} ({repo_id})"
    return (
        f"{about} {state} this machine and HF_HUB_OFFLINE is set: run `qwenkit pull {name}` while "
        "online (`qwenkit list` shows what is here), or pass a local folder or .gguf file with --model"
    )


def _cannot_download_message(repo_id: str, error: BaseException, *, pull_name: str | None = None) -> str:
    from huggingface_hub import constants

    pull_name = pull_name or repo_id
    if getattr(constants, "HF_HUB_OFFLINE", False):
        incomplete = type(error).__name__ == "IncompleteSnapshotError"
        return _not_here_message(pull_name, repo_id, incomplete=incomplete)
    return (
        f"cannot download {repo_id} from Hugging Face (offline? {type(error).__name__}): "
        f"run `qwenkit pull {pull_name}` where the Hub is reachable (or copy the files and pass "
        "them with --model), or set HF_HUB_OFFLINE=1 to use the local HF cache"
    )
