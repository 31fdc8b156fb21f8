"""What ``--model`` names: the default model, a local folder or .gguf file, or a Hub repo."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qwenkit.default_model import DEFAULT_MODEL_NAME, default_model_path
from qwenkit.errors import ModelLoadError

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
]

_GGUF_MAGIC = b"GGUF"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")
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

    ``spec`` is None or ``"default"`` (the embedded default model), a .gguf file, a
    folder with config.json and *.safetensors (or a single .gguf), or a Hugging Face
    repo id ``owner/name`` (downloaded into the HF cache; with ``HF_HUB_OFFLINE=1``
    taken from the cache only). ``progress`` shows progress bars on stderr.
    Raises :class:`ModelLoadError` with a message that says what to do.
    """
    if spec is None or spec == "default":
        return ModelFiles("gguf", default_model_path(progress=progress), DEFAULT_MODEL_NAME)
    if not spec.strip():
        raise ModelLoadError(_unknown_model_message(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        return _resolve_folder(path)
    if path.exists():
        return _resolve_file(path)
    if _looks_like_path(spec):
        raise ModelLoadError(f"model path not found: {os.path.expanduser(spec)}")
    if _REPO_ID.fullmatch(spec):
        return _resolve_repo(spec, progress=progress)
    raise ModelLoadError(_unknown_model_message(spec))


def _unknown_model_message(spec: str) -> str:
    return (
        f"unknown model {spec!r}: pass 'default', a folder, a .gguf file, "
        "or a Hugging Face repo id (owner/name)"
    )


def _looks_like_path(spec: str) -> bool:
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
    with open(path, "rb") as f:
        magic = f.read(len(_GGUF_MAGIC))
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


def _resolve_repo(repo_id: str, *, progress: bool) -> ModelFiles:
    import huggingface_hub
    from huggingface_hub import errors as hf_errors
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    silence = not progress and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=HF_ALLOW_PATTERNS)
    except hf_errors.GatedRepoError as e:  # a RepositoryNotFoundError, so first
        raise ModelLoadError(
            f"Hugging Face repo {repo_id} is gated: accept its terms on "
            f"https://huggingface.co/{repo_id} and log in with `hf auth login`"
        ) from e
    except hf_errors.RepositoryNotFoundError as e:
        raise ModelLoadError(
            f"no Hugging Face repo {repo_id} (if it is private, log in with `hf auth login`)"
        ) from e
    except hf_errors.HFValidationError as e:
        raise ModelLoadError(_unknown_model_message(repo_id)) from e
    except _download_errors() as e:
        raise ModelLoadError(_cannot_download_message(repo_id, e)) from e
    finally:
        if silence:
            enable_progress_bars()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"Hugging Face repo {repo_id} has no config.json (a GGUF-only repo?): download a file "
            f"with `hf download {repo_id} FILE.gguf --local-dir DIR` and pass it with --model"
        )
    files = _resolve_folder(folder)
    return ModelFiles(files.format, files.path, repo_id)


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


def _cannot_download_message(repo_id: str, error: BaseException) -> str:
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_OFFLINE", False):
        incomplete = type(error).__name__ == "IncompleteSnapshotError"
        state = "is incomplete in" if incomplete else "is not in"
        return (
            f"{repo_id} {state} the local Hugging Face cache and HF_HUB_OFFLINE is set: "
            f"run `hf download {repo_id}` while online, or pass a local folder with --model"
        )
    return (
        f"cannot download {repo_id} from Hugging Face (offline? {type(error).__name__}): "
        f"download it elsewhere with `hf download {repo_id}` and pass the folder with --model, "
        "or set HF_HUB_OFFLINE=1 to use the local HF cache"
    )
