"""Models on this machine, as `qwenkit pull`, `list`, `show` and `rm` see them.

Pulled models stay where Hugging Face keeps them, the Hub cache (``HF_HUB_CACHE``, by
default ``~/.cache/huggingface/hub``: ``models--OWNER--NAME/snapshots/<commit>/``), so
transformers, ``hf download`` and qwenkit share one copy; the default model lives in
the qwenkit home. `describe` reads what `list` and `show` print from the files alone
(config, GGUF metadata, safetensors headers, the chat template), without loading weights.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qwenkit.capabilities import Capabilities, checkpoint_capabilities, detect_capabilities
from qwenkit.config import VISION_MODEL_TYPES
from qwenkit.default_model import DEFAULT_MODEL_NAME
from qwenkit.errors import ModelLoadError, QwenkitError
from qwenkit.model_files import (
    ModelFiles,
    cached_snapshots,
    download_repo,
    gguf_filename_on_hub,
    is_hub_name,
    local_path,
    looks_like_path,
    resolve_model,
    resolve_repo_file,
)
from qwenkit.model_names import QWEN_MODELS, is_short_name, lookup, short_name_of
from qwenkit.paths import models_dir


@dataclass(frozen=True)
class ModelInfo:
    """What `qwenkit show` prints about a model's files."""

    architecture: str  # the config's model_type: qwen2, qwen3, qwen3_moe
    num_parameters: int  # every stored weight (a GGUF's untied output matrix included)
    quantization: str  # GGUF file type (Q4_K_M, Q8_0, ...) or the safetensors dtype (BF16, ...)
    context_length: int
    capabilities: Capabilities


@dataclass(frozen=True)
class LocalModel:
    """A model on this machine: `name` (or one of its `aliases`) is what --model takes."""

    name: str
    source: str  # the Hub repo id, or "qwenkit home" for the default model
    files: ModelFiles
    size_bytes: int
    paths: tuple[Path, ...] = field(default=())  # what `rm` deletes
    aliases: tuple[str, ...] = ()  # the default model's "default"


# -- pull ---------------------------------------------------------------------------------


def pull(spec: str, filename: str | None = None, *, progress: bool = True) -> ModelFiles:
    """Download a model into the Hugging Face cache (resuming a partial download).

    ``spec``: a short name (``qwen3:8b``, ``qwen3:8b-q4_k_m``) or a repo id; with
    ``filename``, that one file (a .gguf) of the repo. A safetensors repo brings only
    the files a checkpoint needs (:data:`qwenkit.model_files.HF_ALLOW_PATTERNS`).
    """
    if filename is not None:
        if is_short_name(spec):
            raise QwenkitError(f"pull {spec} takes no FILE: a short name names its file already")
        if not filename.lower().endswith(".gguf"):
            raise QwenkitError(f"{filename} is not a .gguf file: pull a repo without FILE for safetensors")
        return resolve_repo_file(spec, filename, progress=progress)
    if is_short_name(spec):
        try:
            model = lookup(spec)
        except ValueError as e:
            raise QwenkitError(str(e)) from None
        if model.quantization is not None:
            return resolve_repo_file(model.repo_id, gguf_filename_on_hub(model), progress=progress,
                                     pull_name=model.name)
        spec = model.repo_id
    folder = download_repo(spec, progress=progress)
    if not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        raise QwenkitError(
            f"{spec} is not a safetensors checkpoint (no config.json): pull one of its GGUF files with "
            f"`qwenkit pull {spec} FILE.gguf`" + (f" ({', '.join(ggufs)})" if ggufs else "")
        )
    return resolve_model(str(folder))


def plan_remote(spec: str, filename: str | None = None):
    """The memory plan (CPU) of what `pull(spec, filename)` would download, read from the Hub
    before it does: config.json and the safetensors headers (HTTP range reads), or for a GGUF
    its file size with the shape of the model's safetensors repo. None when it cannot be read
    (offline, an unknown repo): the pull then goes on without a plan."""
    from qwenkit import memory_plan as mp

    try:
        from huggingface_hub import HfApi, hf_hub_download

        api = HfApi()
        config_repo, gguf_repo, gguf_file = spec, None, filename
        if filename is not None:
            gguf_repo = spec
        elif is_short_name(spec):
            model = lookup(spec)
            if model.quantization is not None:
                gguf_repo, gguf_file = model.repo_id, gguf_filename_on_hub(model)
                base = model.name.rpartition("-")[0]
                config_repo = QWEN_MODELS[base][0]
            else:
                config_repo = model.repo_id
        shape = mp.config_shape(json.loads(Path(hf_hub_download(config_repo, "config.json")).read_text()))
        dtype = mp.default_dtype("cpu")
        if gguf_repo is not None:
            info = api.model_info(gguf_repo, files_metadata=True)
            weights = next(f.size for f in info.siblings if f.rfilename == gguf_file)
        else:
            metadata = api.get_safetensors_metadata(config_repo)
            weights = 0
            for file in metadata.files_metadata.values():
                for name, tensor in file.tensors.items():
                    weights += mp.held_bytes(name, tensor.dtype, math.prod(tensor.shape),
                                             tensor.data_offsets[1] - tensor.data_offsets[0], mp.ITEMSIZE[dtype])
        return mp.plan_memory(shape, weights, device="cpu", dtype=dtype)
    except Exception:  # noqa: BLE001 - a plan is advice: any failure to read one means none
        return None


# -- list, rm -----------------------------------------------------------------------------


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def list_models() -> list[LocalModel]:
    """The default model (once assembled) and every checkpoint in the Hugging Face cache."""
    models = []
    default = models_dir() / f"{DEFAULT_MODEL_NAME}.gguf"
    if default.is_file():
        marker = default.with_name(default.name + ".sha256")
        # Its own name, as the server's /v1/models reports it, and "default" beside it.
        models.append(LocalModel(DEFAULT_MODEL_NAME, "qwenkit home", ModelFiles("gguf", default, DEFAULT_MODEL_NAME),
                                 default.stat().st_size, (default, marker), aliases=("default",)))
    cache = hub_cache()
    for repo_dir in sorted(cache.glob("models--*--*")) if cache.is_dir() else []:
        repo_id = repo_dir.name.removeprefix("models--").replace("--", "/", 1)
        models.extend(_repo_models(repo_id, repo_dir))
    return models


def _repo_models(repo_id: str, repo_dir: Path) -> list[LocalModel]:
    snapshots = cached_snapshots(repo_id)
    if not snapshots:
        return []
    snapshot = snapshots[0]
    models = []
    if (snapshot / "config.json").is_file() and any(snapshot.glob("*.safetensors")):
        name = short_name_of(repo_id) or repo_id
        size = sum(p.stat().st_size for p in snapshot.iterdir() if p.is_file())
        models.append(LocalModel(name, repo_id, ModelFiles("hf", snapshot, repo_id), size, (repo_dir,)))
    for gguf in sorted(snapshot.glob("*.gguf")):
        if not gguf.exists():  # a link whose blob is gone
            continue
        name = short_name_of(repo_id, gguf.name) or f"{repo_id}/{gguf.name}"
        links = tuple(s / gguf.name for s in snapshots if (s / gguf.name).is_symlink() or (s / gguf.name).exists())
        # The blob a snapshot links to, when it is the repo's own (a link may point anywhere).
        blob = (gguf.resolve(),) if _is_inside(gguf.resolve(), repo_dir) else ()
        models.append(LocalModel(name, repo_id, ModelFiles("gguf", gguf, gguf.stem), gguf.stat().st_size,
                                 links + blob))
    return models


def _is_inside(path: Path, folder: Path) -> bool:
    """Whether `path` lies under `folder`, both with every link resolved."""
    return path.resolve().is_relative_to(folder.resolve())


def _in_store(path: Path) -> bool:
    """Whether `rm` may delete `path` itself: it sits (its folder resolved, the path
    itself not followed) in the Hugging Face cache or the qwenkit models folder."""
    where = path.parent.resolve()
    return any(where.is_relative_to(store.resolve()) for store in (hub_cache(), models_dir()))


def find_local(spec: str) -> LocalModel:
    """The model on this machine that `spec` (a name `list` shows, a short name, a repo id,
    or owner/name/file.gguf) names; a message saying how to get it when there is none."""
    wanted = _canonical(spec)
    models = list_models()
    for model in models:
        if wanted in (_canonical(model.name), _canonical(model.source), *model.aliases) and (
            model.files.format == "hf" or wanted in (_canonical(model.name), *model.aliases)
        ):
            return model
    here = ", ".join(m.name for m in models) or "none"
    if not is_hub_name(spec):
        raise QwenkitError(f"{spec} is not on this machine (here: {here}) nor a name `qwenkit pull` takes "
                           "(a short name such as qwen3:8b, or a Hugging Face repo id)")
    raise QwenkitError(f"{spec} is not on this machine (here: {here}): get it with `qwenkit pull {spec}`")


def _canonical(spec: str) -> str:
    if is_short_name(spec):
        try:
            return lookup(spec).name
        except ValueError:
            return spec.lower()
    return spec.lower() if spec.count("/") == 1 else spec


def remove(spec: str) -> tuple[LocalModel, int]:
    """Delete a model's files from this machine; returns it and the bytes freed.

    Only what lies in the model store is deleted: a link is removed, never followed, so a
    snapshot that links to a file elsewhere loses the link and the file stays.
    """
    model = find_local(spec)
    freed = 0
    for path in model.paths:
        if not _in_store(path):
            continue
        if path.is_symlink() or path.is_file():
            freed += 0 if path.is_symlink() else path.stat().st_size
            path.unlink()
        elif path.is_dir():
            freed += sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
            shutil.rmtree(path)
    if model.source != "qwenkit home":
        _remove_empty_repo(model.files.path)
    return model, freed


def _remove_empty_repo(path: Path) -> None:
    """After a GGUF's removal, drop its repo folder if no file is left in any snapshot."""
    cache = hub_cache().resolve()
    repo_dir = next((p for p in path.parents if p.parent.resolve() == cache), None)
    if repo_dir is None or repo_dir.is_symlink() or not repo_dir.is_dir():
        return
    if not any(p.is_file() for p in (repo_dir / "snapshots").rglob("*")):
        shutil.rmtree(repo_dir)


# -- show ---------------------------------------------------------------------------------


def describe(files: ModelFiles) -> ModelInfo:
    """A model's architecture, size, quantization and capabilities, read from its files."""
    info = _describe_gguf(files.path) if files.format == "gguf" else _describe_hf(files.path)
    return replace(info, capabilities=checkpoint_capabilities(info.capabilities, files))


def _describe_gguf(path: Path) -> ModelInfo:
    import gguf

    from qwenkit.gguf_header import read_header  # the header only: no tensor-type or architecture check

    metadata, tensors = read_header(path)
    arch = metadata.get("general.architecture", "?")
    try:
        quantization = gguf.LlamaFileType(int(metadata["general.file_type"])).name.removeprefix("MOSTLY_")
    except (KeyError, ValueError):
        quantization = Counter(t.tensor_type.name for t in tensors.values()).most_common(1)[0][0]
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    vocab = _TemplateVocab(set(tokens), metadata.get("tokenizer.chat_template"))
    return ModelInfo(
        architecture={"qwen3moe": "qwen3_moe"}.get(arch, arch),
        num_parameters=sum(math.prod(t.shape) for t in tensors.values()),
        quantization=quantization.removeprefix("ALL_"),
        context_length=int(metadata.get(f"{arch}.context_length", 0)),
        capabilities=detect_capabilities(vocab),
    )


def _describe_hf(folder: Path) -> ModelInfo:
    from qwenkit.tokenizer import Tokenizer

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    num_parameters, dtypes = 0, Counter()
    for weights in sorted(folder.glob("*.safetensors")):
        for name, entry in _safetensors_header(weights).items():
            if name != "__metadata__":
                count = math.prod(entry["shape"])
                num_parameters += count
                dtypes[entry["dtype"]] += count
    quantization = (config.get("quantization_config") or {}).get("quant_method", "").upper()
    return ModelInfo(
        architecture=config.get("model_type", "?"),
        num_parameters=num_parameters,
        quantization=quantization or (dtypes.most_common(1)[0][0] if dtypes else "?"),
        context_length=int(config.get("max_position_embeddings", 0)
                           or (config.get("text_config") or {}).get("max_position_embeddings", 0)),
        capabilities=replace(detect_capabilities(Tokenizer.from_dir(folder)),
                                         vision=config.get("model_type") in VISION_MODEL_TYPES),
    )


def _safetensors_header(path: Path) -> dict[str, Any]:
    # The format: an 8-byte little-endian length, then that many bytes of JSON.
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


class _TemplateVocab:
    """Enough of a tokenizer for `detect_capabilities`: which marker tokens exist, and the
    chat template (a GGUF without one gets the built-in Qwen3 template, as when loaded)."""

    def __init__(self, tokens: set[str], chat_template: str | None):
        from qwenkit.chat.template import ChatTemplate, qwen3_template

        self.tokens = tokens
        self.template = ChatTemplate(chat_template or qwen3_template())

    def token_to_id(self, token: str) -> int | None:
        return 0 if token in self.tokens else None

    def apply_chat_template(self, messages: Any, **kwargs: Any) -> str:
        return self.template.render(messages, **kwargs)


def format_parameters(n: int) -> str:
    """494032768 -> "494M", 7615616512 -> "7.6B"."""
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    return f"{n / 1e6:.0f}M"


def format_size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def local_files(spec: str) -> ModelFiles:
    """The files `spec` names, from this machine only: never a download."""
    if spec in ("default", DEFAULT_MODEL_NAME) or local_path(spec) is not None:
        return resolve_model(spec, progress=True)  # the default model's first assembly says so
    if looks_like_path(spec):
        raise ModelLoadError(f"model path not found: {spec}")
    try:
        return find_local(spec).files
    except QwenkitError as e:
        raise ModelLoadError(str(e)) from None
