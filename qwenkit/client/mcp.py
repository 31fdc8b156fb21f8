"""MCP servers' tools as qwenkit client tools, through the official `mcp` SDK.

Servers are configured by the JSON that Claude Desktop and Qwen-Agent use:

    {"mcpServers": {
        "files": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "."],
                  "env": {"DEBUG": "1"}},
        "search": {"url": "http://127.0.0.1:9000/mcp", "headers": {"Authorization": "Bearer ..."}}}}

    with MCPToolset(load_mcp_config("mcp.json")) as toolset:
        client.prompt("List the files").tools(*toolset.tools).call().content()

    async with MCPToolset("mcp.json") as toolset:  # the same object, for asyncio code
        await toolset.tools[0].ainvoke({"path": "."})

The SDK is asyncio-only and its sessions must be entered and left in one task, so each
toolset runs its sessions on a private event loop on a daemon thread; sync and async
callers both submit calls to that loop. A tool's failure (an MCP error, a result marked
`isError`, a dead server, a timeout) is returned as the tool's text, for the model to read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from qwenkit.client.tools import Tool

__all__ = ["MCPServerConfig", "MCPTool", "MCPToolset", "load_mcp_config"]

logger = logging.getLogger(__name__)

_HTTP_TYPES = {"streamable-http", "streamable_http", "streamableHttp", "http"}


@dataclass(frozen=True)
class MCPServerConfig:
    """One entry of `mcpServers`: a `command` to run over stdio, or a streamable-HTTP `url`."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None  # laid over the SDK's safe default environment
    cwd: str | None = None
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def transport(self) -> str:
        return "stdio" if self.command else "streamable-http"

    @classmethod
    def from_dict(cls, name: str, entry: Mapping[str, Any]) -> MCPServerConfig:
        if not isinstance(entry, Mapping):
            raise ValueError(f"MCP server {name!r}: expected an object, got {type(entry).__name__}")
        kind = entry.get("type") or entry.get("transport")
        if kind is not None and kind != "stdio" and kind not in _HTTP_TYPES:
            raise ValueError(f"MCP server {name!r}: unsupported transport {kind!r} (stdio or streamable-http)")
        if ("command" in entry) == ("url" in entry):
            raise ValueError(f"MCP server {name!r}: give exactly one of 'command' (stdio) or 'url' (streamable HTTP)")
        unknown = set(entry) - {"command", "args", "env", "cwd", "url", "headers", "type", "transport",
                                "disabled", "description", "timeout"}
        if unknown:
            logger.warning("MCP server %r: ignoring unknown keys %s", name, sorted(unknown))
        env = entry.get("env")
        return cls(name=name, command=entry.get("command"), args=tuple(str(a) for a in entry.get("args", ())),
                   env={str(k): str(v) for k, v in env.items()} if env is not None else None,
                   cwd=entry.get("cwd"), url=entry.get("url"),
                   headers={str(k): str(v) for k, v in (entry.get("headers") or {}).items()})


def load_mcp_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> list[MCPServerConfig]:
    """The servers of a `{"mcpServers": {...}}` config: a path to its JSON file, or the dict.
    Entries with `"disabled": true` are left out."""
    if isinstance(source, Mapping):
        data = source
    else:
        data = json.loads(Path(source).read_text(encoding="utf-8"))
    if not isinstance(data, Mapping) or not isinstance(data.get("mcpServers"), Mapping):
        raise ValueError('an MCP config is an object with an "mcpServers" object')
    return [MCPServerConfig.from_dict(name, entry) for name, entry in data["mcpServers"].items()
            if not (isinstance(entry, Mapping) and entry.get("disabled"))]


class MCPTool(Tool):
    """A tool of an MCP server; calling it calls the server. `name` is the MCP name, or
    `server-name` where two servers offer the same one; `mcp_name` and `server` say which."""

    def __init__(self, toolset: MCPToolset, server: str, mcp_tool: Any, *, name: str):
        # Not Tool.__init__: there is no Python function; the server validates the arguments.
        self.fn = self.__call__
        self.name = name
        self.server = server
        self.mcp_name = mcp_tool.name
        self.description = mcp_tool.description or ""
        self.parameters = dict(mcp_tool.inputSchema or {"type": "object", "properties": {}})
        self.parameters.pop("title", None)  # as Tool's: the name says it
        self._toolset = toolset

    def __call__(self, **arguments: Any) -> str:
        return self.invoke(arguments)

    def __repr__(self) -> str:
        return f"MCPTool({self.name!r}, server={self.server!r})"

    def invoke(self, arguments: str | dict[str, Any] | None) -> str:
        """Call the server's tool on the model's JSON arguments; its text, or the error as text."""
        try:
            future = self._toolset._submit(self._call(arguments))
        except Exception as e:  # noqa: BLE001 - e.g. the toolset is closed
            return f"Error: {type(e).__name__}: {e}"
        return future.result()

    async def ainvoke(self, arguments: str | dict[str, Any] | None) -> str:
        try:
            future = self._toolset._submit(self._call(arguments))
        except Exception as e:  # noqa: BLE001
            return f"Error: {type(e).__name__}: {e}"
        return await asyncio.wrap_future(future)

    async def _call(self, arguments: str | dict[str, Any] | None) -> str:
        """Runs on the toolset's loop; never raises."""
        try:
            if isinstance(arguments, str):
                arguments = json.loads(arguments) if arguments.strip() else {}
            if arguments is not None and not isinstance(arguments, dict):
                raise TypeError(f"arguments must be a JSON object, got {type(arguments).__name__}")
            session = self._toolset._sessions[self.server]
            result = await session.call_tool(self.mcp_name, arguments or {},
                                             read_timeout_seconds=timedelta(seconds=self._toolset.timeout))
        except Exception as e:  # noqa: BLE001 - McpError, a closed stream, bad JSON: the model reads it
            return f"Error: {type(e).__name__}: {_message(e)}"
        text = _result_text(result)
        return f"Error: {text}" if result.isError and not text.startswith("Error") else text


class MCPToolset:
    """Connections to MCP servers and their tools (`.tools`), as a sync or async context manager.

    `config` is a `{"mcpServers": ...}` dict or JSON file path, or a list of `MCPServerConfig`.
    `timeout` bounds connecting to a server and each tool call, in seconds. `errlog` takes the
    stdio servers' stderr (default: this process's stderr, or nowhere if it has no file)."""

    def __init__(self, config: str | os.PathLike[str] | Mapping[str, Any] | list[MCPServerConfig], *,
                 timeout: float = 30.0, errlog: Any = None):
        self.servers = list(config) if isinstance(config, list) else load_mcp_config(config)
        self.timeout = timeout
        self.errlog = errlog
        self.tools: list[MCPTool] = []
        self._sessions: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: list[concurrent.futures.Future] = []

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> MCPToolset:
        """Connect every server and list its tools; on any failure, close the others and raise."""
        if self._loop is not None:
            raise RuntimeError("this MCPToolset is already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qwenkit-mcp", daemon=True)
        self._thread.start()
        try:
            self._stop = self._submit(_make_event()).result()
            listed: dict[str, list[Any]] = {}
            for server in self.servers:
                ready: concurrent.futures.Future = concurrent.futures.Future()
                self._tasks.append(self._submit(self._serve(server, ready)))
                listed[server.name] = ready.result()
        except BaseException:
            self.close()
            raise
        self.tools = self._name_tools(listed)
        return self

    def close(self) -> None:
        """Leave every session (stdio servers are shut down) and stop the loop thread. Idempotent."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._stop is not None:
            loop.call_soon_threadsafe(self._stop.set)
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                task.result(timeout=self.timeout)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=self.timeout)
        if not self._thread.is_alive():
            loop.close()
        self._sessions.clear()
        self._tasks.clear()
        self._stop = None

    def __enter__(self) -> MCPToolset:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> MCPToolset:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.to_thread(self.close)

    def tool(self, name: str) -> MCPTool:
        """The tool called `name` (as the model sees it)."""
        for t in self.tools:
            if t.name == name:
                return t
        raise KeyError(name)

    # -- on the loop thread ----------------------------------------------------------

    def _submit(self, coroutine: Any) -> concurrent.futures.Future:
        if self._loop is None:
            coroutine.close()
            raise RuntimeError("the MCPToolset is not started (use it as a context manager)")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    async def _serve(self, server: MCPServerConfig, ready: concurrent.futures.Future) -> None:
        """Hold one session open until the toolset closes: the SDK's task groups must be
        entered and left by the same task."""
        import anyio
        from mcp import ClientSession

        try:
            async with contextlib.AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(self._transport(server, stack))
                session = await stack.enter_async_context(ClientSession(read, write))
                with anyio.fail_after(self.timeout):
                    await session.initialize()
                    tools = await _list_tools(session)
                self._sessions[server.name] = session
                ready.set_result(tools)
                await self._stop.wait()
        except BaseException as e:  # noqa: BLE001 - reported to start(), or logged once running
            error = _leaf(e)
            if not ready.done():
                ready.set_exception(ConnectionError(
                    f"MCP server {server.name!r} ({server.transport}): {type(error).__name__}: {_message(error)}"))
            elif not isinstance(error, asyncio.CancelledError):
                logger.warning("MCP server %r closed: %s", server.name, error)
        finally:
            self._sessions.pop(server.name, None)

    def _transport(self, server: MCPServerConfig, stack: contextlib.AsyncExitStack) -> Any:
        if server.command:
            from mcp import StdioServerParameters
            from mcp.client.stdio import stdio_client

            params = StdioServerParameters(command=server.command, args=list(server.args),
                                           env=dict(server.env) if server.env is not None else None, cwd=server.cwd)
            return stdio_client(params, errlog=self._errlog())
        from mcp.client import streamable_http

        if hasattr(streamable_http, "streamable_http_client"):  # mcp >= 1.24
            from mcp.shared._httpx_utils import create_mcp_http_client

            client = create_mcp_http_client(headers=dict(server.headers) or None)
            stack.push_async_callback(client.aclose)
            return _two(streamable_http.streamable_http_client(server.url, http_client=client))
        return _two(streamable_http.streamablehttp_client(server.url, headers=dict(server.headers) or None))

    def _errlog(self) -> Any:
        if self.errlog is not None:
            return self.errlog
        try:
            sys.stderr.fileno()
            return sys.stderr
        except (AttributeError, OSError, ValueError):  # e.g. a captured stream without a file
            return subprocess.DEVNULL

    def _name_tools(self, listed: dict[str, list[Any]]) -> list[MCPTool]:
        counts: dict[str, int] = {}
        for tools in listed.values():
            for t in tools:
                counts[t.name] = counts.get(t.name, 0) + 1
        out = []
        for server, tools in listed.items():
            for t in tools:
                name = t.name if counts[t.name] == 1 else _function_name(f"{server}-{t.name}")
                out.append(MCPTool(self, server, t, name=name))
        return out


async def _make_event() -> asyncio.Event:
    return asyncio.Event()


async def _list_tools(session: Any) -> list[Any]:
    tools, cursor = [], None
    while True:
        page = await session.list_tools(cursor) if cursor else await session.list_tools()
        tools.extend(page.tools)
        cursor = page.nextCursor
        if not cursor:
            return tools


@contextlib.asynccontextmanager
async def _two(transport: Any):
    """(read, write) of a streamable-HTTP transport, which also yields a session-id getter."""
    async with transport as (read, write, _):
        yield read, write


def _result_text(result: Any) -> str:
    parts = []
    for item in result.content:
        kind = getattr(item, "type", None)
        if kind == "text":
            parts.append(item.text)
        elif kind == "resource" and hasattr(item.resource, "text"):
            parts.append(item.resource.text)
        elif kind == "resource_link":
            parts.append(f"[resource: {item.uri}]")
        else:
            parts.append(f"[{kind}: {getattr(item, 'mimeType', '')}]")
    if not parts and result.structuredContent is not None:
        return json.dumps(result.structuredContent, ensure_ascii=False)
    return "\n".join(parts)


def _leaf(error: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from the SDK's task groups."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def _message(error: BaseException) -> str:
    error = _leaf(error)
    return str(error) or repr(error)


def _function_name(name: str) -> str:
    """OpenAI's function names: ^[a-zA-Z0-9_-]{1,64}$."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:64]
