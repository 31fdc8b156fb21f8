"""qwenkit.client.mcp against tests/mcp_echo_server.py over stdio and streamable HTTP."""

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mcp")

from qwenkit.client import ChatClient, ChatOptions, tool  # noqa: E402
from qwenkit.client.mcp import MCPTool, MCPToolset, load_mcp_config  # noqa: E402

SERVER = str(Path(__file__).with_name("mcp_echo_server.py"))
STDIO = {"command": sys.executable, "args": [SERVER]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def http_url():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, SERVER, "http", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while True:
        assert proc.poll() is None, "the MCP HTTP server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.time() < deadline, "the MCP HTTP server did not start"
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/mcp"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def stdio_toolset():
    with MCPToolset({"mcpServers": {"echo": STDIO}}) as toolset:
        yield toolset


def test_load_mcp_config(tmp_path):
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {
        "files": {"command": "npx", "args": ["-y", "server"], "env": {"DEBUG": "1"}},
        "web": {"url": "http://127.0.0.1:1/mcp", "headers": {"Authorization": "Bearer x"}},
        "off": {"command": "x", "disabled": True}}}))
    files, web = load_mcp_config(path)
    assert (files.name, files.transport, files.command, files.args, files.env) == \
        ("files", "stdio", "npx", ("-y", "server"), {"DEBUG": "1"})
    assert (web.name, web.transport, web.url, web.headers) == \
        ("web", "streamable-http", "http://127.0.0.1:1/mcp", {"Authorization": "Bearer x"})
    for bad in [{}, {"mcpServers": {"x": {}}}, {"mcpServers": {"x": {"command": "a", "url": "b"}}},
                {"mcpServers": {"x": {"url": "b", "type": "sse"}}}]:
        with pytest.raises(ValueError):
            load_mcp_config(bad)


def test_stdio_tools_and_schemas(stdio_toolset):
    tools = stdio_toolset.tools
    assert [t.name for t in tools] == ["add", "echo", "fail"]
    assert all(isinstance(t, MCPTool) and t.server == "echo" for t in tools)
    add = stdio_toolset.tool("add")
    assert add.description == "Add two integers."
    assert add.schema()["function"]["name"] == "add"
    params = add.parameters
    assert params["type"] == "object" and params["required"] == ["a", "b"]
    assert {k: v["type"] for k, v in params["properties"].items()} == {"a": "integer", "b": "integer"}
    assert stdio_toolset.tool("fail").parameters["properties"]["reason"]["default"] == "boom"


def test_stdio_calls_sync_and_async(stdio_toolset):
    add, echo = stdio_toolset.tool("add"), stdio_toolset.tool("echo")
    assert add.invoke('{"a": 2, "b": 3}') == "5"
    assert echo(text="héllo") == "héllo"

    async def main():
        return await asyncio.gather(add.ainvoke({"a": 40, "b": 2}), echo.ainvoke('{"text": "hi"}'))

    assert asyncio.run(main()) == ["42", "hi"]


def test_errors_come_back_as_text(stdio_toolset):
    failed = stdio_toolset.tool("fail").invoke({"reason": "test"})
    assert failed.startswith("Error") and "failed on purpose: test" in failed
    assert stdio_toolset.tool("add").invoke({"a": "x", "b": 1}).startswith("Error")
    assert stdio_toolset.tool("add").invoke("{not json").startswith("Error: JSONDecodeError")


def test_http_and_name_collisions(http_url):
    async def main():
        config = {"mcpServers": {"web": {"url": http_url}, "local": STDIO}}
        async with MCPToolset(config) as toolset:
            names = [t.name for t in toolset.tools]
            results = await asyncio.gather(toolset.tool("web-add").ainvoke({"a": 1, "b": 2}),
                                           toolset.tool("local-echo").ainvoke({"text": "x"}))
            failed = await toolset.tool("web-fail").ainvoke({})
            return names, results, failed, toolset.tool("web-add").mcp_name

    names, results, failed, mcp_name = asyncio.run(main())
    assert names == ["web-add", "web-echo", "web-fail", "local-add", "local-echo", "local-fail"]
    assert results == ["3", "x"] and mcp_name == "add"
    assert failed.startswith("Error") and "failed on purpose: boom" in failed
    with MCPToolset({"mcpServers": {"web": {"url": http_url}}}) as toolset:
        assert [t.name for t in toolset.tools] == ["add", "echo", "fail"]  # no collision, no prefix
        assert toolset.tool("add").invoke({"a": 5, "b": 6}) == "11"


def test_unreachable_servers_raise_on_start_and_closed_toolset_answers_text():
    with pytest.raises(ConnectionError, match="'gone'"):
        MCPToolset({"mcpServers": {"gone": {"command": "/nonexistent/mcp-server"}}}, timeout=5).start()
    with pytest.raises(ConnectionError, match="'down'"):
        MCPToolset({"mcpServers": {"down": {"url": f"http://127.0.0.1:{_free_port()}/mcp"}}}, timeout=5).start()
    toolset = MCPToolset({"mcpServers": {"echo": STDIO}}).start()
    add = toolset.tool("add")
    toolset.close()
    toolset.close()  # idempotent
    assert add.invoke({"a": 1, "b": 2}).startswith("Error: RuntimeError")


def test_stdio_subprocess_is_shut_down():
    psutil = pytest.importorskip("psutil")

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    with MCPToolset({"mcpServers": {"echo": STDIO}}):
        started = {p.pid for p in me.children(recursive=True)} - before
        assert started
    assert not ({p.pid for p in me.children(recursive=True)} & started)


# -- end to end: ChatClient over the in-process engine ------------------------------


def test_chat_client_calls_mcp_tool_and_model_reads_result(stdio_toolset, llm):
    from tiny import scripted

    from qwenkit.client import LocalChatModel

    model = LocalChatModel(llm)
    seen, original = [], model.call

    def call(messages, *args, **kwargs):  # record what the model is shown on each round
        seen.append((list(messages), [t["function"]["name"] for t in kwargs.get("tools") or []]))
        return original(messages, *args, **kwargs)

    model.call = call

    @tool
    def unused(x: int) -> int:
        """A local tool beside the MCP ones."""
        return x

    client = ChatClient(model, default_options=ChatOptions(temperature=0, max_tokens=200,
                                                                         enable_thinking=False))
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 19, "b": 23}}\n</tool_call>'
    with scripted(llm, call, "The sum is 42."):
        response = client.prompt("What is 19 + 23?").tools(unused, *stdio_toolset.tools).call().chat_response()
    assert response.content == "The sum is 42."
    assert [m["role"] for m in response.messages] == ["assistant", "tool", "assistant"]
    assert response.messages[1]["name"] == "add" and response.messages[1]["content"] == "42"
    assert [names for _, names in seen] == [["unused", "add", "echo", "fail"]] * 2
    assert seen[1][0][-1]["role"] == "tool" and seen[1][0][-1]["content"] == "42"  # the result reached the model
