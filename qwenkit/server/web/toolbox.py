"""The MCP tools the web page may offer the model (`qwenkit serve --mcp config.json`).

The page runs the tool loop itself (it sees each call and shows it); the server holds
the MCP connections, lists the tools' schemas and runs a call when the page asks.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from qwenkit.errors import QwenkitError

logger = logging.getLogger(__name__)


class Toolbox:
    """An `MCPToolset` started once, on first use or at the server's start; a server that
    cannot be reached leaves the toolbox empty with `error` set, and the chat works on."""

    def __init__(self, config_path: str | Path):
        from qwenkit.client.mcp import MCPToolset

        try:
            self._toolset = MCPToolset(str(config_path))  # reads and checks the config now: fail at startup
        except (OSError, ValueError) as e:
            raise QwenkitError(f"--mcp {config_path}: {e}") from e
        self._lock = threading.Lock()
        self._started = False
        self.error: str | None = None

    def start(self) -> None:
        """Connect the servers (idempotent; blocking: call it off the event loop)."""
        with self._lock:
            if self._started:
                return
            self._started = True
            try:
                self._toolset.start()
            except Exception as e:  # noqa: BLE001 - reported by GET /web/api/tools
                self.error = str(e)
                logger.warning("MCP tools unavailable: %s", e)

    def schemas(self) -> list[dict[str, Any]]:
        """OpenAI function-tool schemas of every tool."""
        self.start()
        return [t.schema() for t in self._toolset.tools]

    def tool(self, name: str) -> Any | None:
        self.start()
        return next((t for t in self._toolset.tools if t.name == name), None)

    def close(self) -> None:
        with self._lock:
            self._toolset.close()
