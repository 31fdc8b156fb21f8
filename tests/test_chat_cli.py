"""`qwenkit chat`: driven in a pseudo-terminal against a real `qwenkit serve` whose tiny model
is scripted (a tool call, then a thought and an answer), with an MCP server's tools; and on
the local engine through standard input."""

import io
import json
import os
import re
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from tiny import scripted

from qwenkit.chat_cli import ChatSession, _Style
from qwenkit.cli import _parser, main

pexpect = pytest.importorskip("pexpect")

ROOT = Path(__file__).parent.parent
ECHO_SERVER = str(Path(__file__).with_name("mcp_echo_server.py"))
CALL_ECHO = '<tool_call>\n{"name": "echo", "arguments": {"text": "pineapple"}}\n</tool_call>'
ANSWER = "<think>the tool answered</think>It said pineapple."


def spawn(*args: str):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    return pexpect.spawn(sys.executable, ["-m", "qwenkit", "chat", *args], env=env, encoding="utf-8",
                         timeout=120, dimensions=(40, 200))


def test_chat_in_a_terminal_with_a_tool_then_resumed(allm, server, tmp_path):
    url = server
    mcp = tmp_path / "mcp.json"
    mcp.write_text(json.dumps({"mcpServers": {"echo": {"command": sys.executable, "args": [ECHO_SERVER]}}}))
    db = str(tmp_path / "chat.sqlite3")
    with scripted(allm, CALL_ECHO, ANSWER):
        child = spawn("--base-url", f"{url}/v1", "--db", db, "--mcp", str(mcp))
        child.expect(r"new conversation (\w+) .*tools: add, echo, fail")
        conversation = child.match.group(1)
        child.expect("> ")
        child.sendline("Say pineapple with the echo tool.")
        child.expect_exact("→ echo(")
        child.expect_exact("← pineapple")
        child.expect_exact("\x1b[2mthinking: the tool answered")  # thinking is dimmed
        child.expect_exact("\x1b[0m\r\nIt said pineapple.")
        child.expect("> ")
        child.sendline("/history")
        child.expect_exact("user:\x1b[0m Say pineapple with the echo tool.")
        child.expect_exact("calls echo(")
        child.expect_exact("[tool echo] pineapple")
        child.expect_exact("assistant:\x1b[0m It said pineapple.")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0

    child = spawn("--base-url", f"{url}/v1", "--db", db, "--resume", conversation)
    child.expect_exact(f"resumed conversation {conversation}")
    child.expect_exact("assistant:\x1b[0m It said pineapple.")  # the history survived the process
    child.expect("> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_on_the_local_model_from_standard_input(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    db = tmp_path / "chat.sqlite3"
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/budget 7\n/no_think\n/history\n"))
    assert main(["chat", "--model", str(tiny_checkpoint), "--db", str(db), "--max-tokens", "4",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    conversation = re.search(r"new conversation (\w+)", out).group(1)
    assert "\x1b[" not in out  # no colours when the output is not a terminal
    assert "thinking budget 7 tokens" in out and "thinking off" in out
    assert f"conversation {conversation}:\nuser: Hello\nassistant:" in out


def test_chat_errors_are_one_line(tmp_path, capsys):
    assert main(["chat", "--db", str(tmp_path / "c.db"), "--resume", "nope"]) == 1
    assert capsys.readouterr().err.startswith("error: no conversation 'nope'")
    assert main(["chat", "--db", str(tmp_path / "c.db"), "--thinking-budget", "-1"]) == 1


def test_a_failed_turn_is_reported_and_the_chat_goes_on():
    class Failing:
        def prompt(self, text):
            raise ValueError("the prompt is too long")

    out = io.StringIO()
    session = ChatSession(Failing(), None, conversation_id="c", enable_thinking=None, thinking_budget=None,
                          out=out, style=_Style(False))
    session.turn("hi")
    assert out.getvalue() == "error: the prompt is too long\n"


def test_session_commands_set_the_request_options():
    out = io.StringIO()
    session = ChatSession(None, None, conversation_id="c", enable_thinking=None, thinking_budget=None,
                          out=out, style=_Style(False))
    assert session.options() == {}
    for line in ("/think", "/budget 256", "/budget lots", "/frobnicate"):
        assert session.command(line)
    assert session.options() == {"enable_thinking": True, "thinking_budget": 256}
    assert "/budget takes a number" in out.getvalue() and "unknown command /frobnicate" in out.getvalue()
    session.command("/no_think")
    session.command("/budget off")
    assert session.options() == {"enable_thinking": False}
    session.command("/new")
    assert session.conversation_id != "c"
    assert not session.command("/exit")
    args = _parser().parse_args(["chat", "--base-url", "http://x/v1", "--resume", "abc", "--no-think"])
    assert isinstance(args, Namespace) and args.func.__name__ == "_chat"
