"""Where qwenkit keeps its files: one home folder, and what lives in it.

``$QWENKIT_HOME``, else the user cache folder (``~/.cache/qwenkit`` on Linux). Every file
qwenkit writes on its own goes under it, so that one variable moves (or sandboxes) all
of them. Each path is a function: the environment is read when the path is needed, not
at import. Plain Python, no torch.
"""

from __future__ import annotations

import os
from pathlib import Path


def qwenkit_home() -> Path:
    """``$QWENKIT_HOME``, else the user cache folder."""
    home = os.environ.get("QWENKIT_HOME")
    if home:
        return Path(home).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("qwenkit", appauthor=False))


def models_dir() -> Path:
    """The default model, assembled from its installed parts."""
    return qwenkit_home() / "models"


def kernels_dir() -> Path:
    """The CPU kernels, compiled once per CPU and source hash."""
    return qwenkit_home() / "kernels"


def inductor_cache_dir() -> Path:
    """torch.compile's kernels and FX graph cache (unless TORCHINDUCTOR_CACHE_DIR is set)."""
    return qwenkit_home() / "inductor"


def chat_db() -> Path:
    """The conversations of `qwenkit chat` (SQLite)."""
    return qwenkit_home() / "chat.sqlite3"


def web_chat_db() -> Path:
    """The web page's conversations (SQLite)."""
    return qwenkit_home() / "conversations.sqlite3"


def responses_db() -> Path:
    """Stored `/v1/responses` (SQLite)."""
    return qwenkit_home() / "responses.sqlite3"
