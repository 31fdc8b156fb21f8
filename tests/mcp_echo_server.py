"""A tiny MCP server for tests/test_mcp.py: `python mcp_echo_server.py [stdio | http PORT]`."""

import sys

from mcp.server.fastmcp import FastMCP

mcp = FastMCP("echo", log_level="WARNING")


@mcp.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@mcp.tool()
def echo(text: str) -> str:
    """Echo the text back."""
    return text


@mcp.tool()
def fail(reason: str = "boom") -> str:
    """Always raises."""
    raise RuntimeError(f"failed on purpose: {reason}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "http":
        mcp.settings.port = int(sys.argv[2])
        mcp.run(transport="streamable-http")
    else:
        mcp.run()
