"""`qwenkit chat`: an interactive terminal chat on the local model or a remote endpoint.

Built on `ChatClient` with a `MessageChatMemoryAdvisor` over `SQLiteChatMemory`, so every
turn is stored as it is answered and `--resume ID` picks a conversation up again, in this
process or a later one. Thinking streams dimmed on stderr-style gray, the answer in plain
text; tool calls (from `--mcp config.json`) and their results are shown as they run.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any, TextIO

from qwenkit import sampling_fields
from qwenkit.client.tools import Tool
from qwenkit.errors import QwenkitError
from qwenkit.paths import chat_db

HELP = """commands:
  /think        answer with thinking (Qwen3 hybrid models)
  /no_think     answer without thinking
  /budget N     at most N thinking tokens (/budget off: no limit)
  /image PATH   attach an image to your next message (a vision-language model reads it)
  /new          start a new conversation
  /history      show this conversation's stored messages
  /help         this list
  /exit         leave (or Ctrl-D); Ctrl-C stops an answer"""


class _Style:
    def __init__(self, enabled: bool):
        self.dim = "\033[2m" if enabled else ""
        self.bold = "\033[1m" if enabled else ""
        self.cyan = "\033[36m" if enabled else ""
        self.reset = "\033[0m" if enabled else ""


class ChatSession:
    """The state of one `qwenkit chat` run: the client, the conversation, the switches."""

    def __init__(self, client: Any, memory: Any, *, conversation_id: str, enable_thinking: bool | None,
                 thinking_budget: int | None, out: TextIO, style: _Style, thinking_note: Any = None):
        self.client, self.memory = client, memory
        self.conversation_id = conversation_id
        self.enable_thinking = enable_thinking
        self.thinking_budget = thinking_budget
        self.out, self.style = out, style
        # (no_think, budget) -> why those options do nothing on this model, or None
        self.thinking_note = thinking_note or (lambda **_: None)
        self.attachments: list[Any] = []  # images (client Media) for the next message

    # -- commands ----------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a /command; False when the session should end."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/think":
            self.enable_thinking = True
            self.say(self.thinking_note(budget=True) or "thinking on")
        elif name == "/no_think":
            self.enable_thinking = False
            self.say(self.thinking_note(no_think=True) or "thinking off")
        elif name == "/budget":
            if arg in ("off", "none", ""):
                self.thinking_budget = None
                self.say(self.thinking_note(budget=True) or "thinking budget off")
            elif arg.isdigit():
                self.thinking_budget = int(arg)
                self.say(self.thinking_note(budget=True) or f"thinking budget {self.thinking_budget} tokens")
            else:
                self.say(f"/budget takes a number of tokens or 'off', not {arg!r}")
        elif name == "/image":
            from qwenkit.client.types import Media

            try:
                self.attachments.append(Media.from_file(Path(arg).expanduser()))
            except (OSError, ValueError) as e:
                self.say(f"/image: {e}" if arg else "/image takes the path of an image file")
            else:
                self.say(f"attached {arg} ({len(self.attachments)} image(s) go with your next message)")
        elif name == "/new":
            self.conversation_id = new_conversation_id()
            self.say(f"new conversation {self.conversation_id}")
        elif name == "/history":
            self.show_history()
        elif name == "/help":
            self.say(HELP)
        else:
            self.say(f"unknown command {name}; /help lists them")
        return True

    def say(self, text: str) -> None:
        self.out.write(f"{self.style.dim}{text}{self.style.reset}\n")
        self.out.flush()

    def show_history(self) -> None:
        messages = self.memory.get(self.conversation_id)
        if not messages:
            self.say(f"conversation {self.conversation_id} is empty")
            return
        self.say(f"conversation {self.conversation_id}:")
        for m in messages:
            role = m.get("role")
            if role == "tool":
                self.say(f"  [tool {m.get('name', '')}] {_short(m.get('content') or '')}")
                continue
            for call in m.get("tool_calls") or []:
                fn = call.get("function", {})
                self.say(f"  [{role} calls {fn.get('name')}({fn.get('arguments')})]")
            content = m.get("content")
            if isinstance(content, list):  # a message with images
                content = " ".join("[image]" if p.get("type") == "image_url" else p.get("text", "") for p in content)
            if content:
                self.out.write(f"{self.style.bold}{role}:{self.style.reset} {content}\n")
        self.out.flush()

    # -- a turn ------------------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.enable_thinking is not None:
            options["enable_thinking"] = self.enable_thinking
        if self.thinking_budget is not None:
            options["thinking_budget"] = self.thinking_budget
        return options

    def turn(self, text: str) -> None:
        """Stream the answer to `text`; Ctrl-C stops it (the turn is then not stored)."""
        s, out = self.style, self.out
        thinking = answering = False
        chunks = None
        try:
            media, self.attachments = self.attachments, []
            request = self.client.prompt().user(text, media=media) if media else self.client.prompt(text)
            stream = request.options(self.options()).advisors(conversation_id=self.conversation_id).stream()
            chunks = stream.chunks()
            for chunk in chunks:
                if chunk.reasoning_content:
                    if not thinking:
                        out.write(f"{s.dim}thinking: ")
                        thinking = True
                    out.write(chunk.reasoning_content)
                if chunk.content:
                    if thinking:
                        out.write(f"{s.reset}\n")
                        thinking = False
                    answering = True
                    out.write(chunk.content)
                out.flush()
        except KeyboardInterrupt:
            out.write(f"{s.reset}\n")
            self.say("(stopped)")
            return
        except Exception as e:  # noqa: BLE001 - a failed turn (too long, endpoint down) ends the turn, not the chat
            out.write(f"{s.reset}\n" if thinking or answering else "")
            self.say(f"error: {e}")
            return
        finally:
            if chunks is not None:
                chunks.close()  # a stopped answer aborts its request
        if thinking:
            out.write(s.reset)
        if thinking or answering:
            out.write("\n")
        self._show_sources(stream.chat_response())
        out.flush()

    def _show_sources(self, response: Any) -> None:
        """With --docs: the files the answer was given (RetrievalAdvisor's documents)."""
        from qwenkit.client.retrieval import RETRIEVED_DOCUMENTS, sources

        if response is not None and RETRIEVED_DOCUMENTS in response.metadata:
            found = sources(response)
            self.say(f"sources: {', '.join(found)}" if found else "sources: none found in the documents")


def new_conversation_id() -> str:
    return secrets.token_hex(4)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ShownTool(Tool):
    """A tool that prints its calls and results as the model makes them."""

    def __init__(self, tool: Tool, out: TextIO, style: _Style):  # noqa: super().__init__ wants a function
        self.tool, self.out, self.style = tool, out, style
        self.name, self.description, self.parameters = tool.name, tool.description, tool.parameters

    def invoke(self, arguments: Any) -> str:
        shown = arguments if isinstance(arguments, str) else json.dumps(arguments)
        self._line(f"→ {self.name}({_short(shown)})")
        result = self.tool.invoke(arguments)
        self._line(f"← {_short(result)}")
        return result

    def _line(self, text: str) -> None:
        self.out.write(f"{self.style.cyan}{text}{self.style.reset}\n")
        self.out.flush()


def _chat_model(args: argparse.Namespace) -> Any:
    from qwenkit.client import LocalChatModel, OpenAIChatModel

    if args.base_url:
        try:
            import openai  # noqa: F401
        except ImportError:
            raise QwenkitError("--base-url needs the openai package: pip install 'qwenkit[client]'") from None
        api_key = args.api_key or os.environ.get("QWENKIT_API_KEY") or os.environ.get("OPENAI_API_KEY")
        model = OpenAIChatModel(args.base_url, api_key, args.model)
        if args.model == "default":
            try:
                model.model = model.client.models.list().data[0].id
            except Exception as e:  # noqa: BLE001 - any failure here means the endpoint is not usable
                raise QwenkitError(f"cannot list the models at {args.base_url}: {e}") from None
        return model
    from qwenkit.cli_loading import load_llm

    return LocalChatModel(load_llm(args))  # every model option `run` takes, --threads included


def _thinking_note(model: Any):
    """(no_think=, budget=) -> why those thinking options do nothing on `model`, or None:
    from the local model's checkpoint, or from a remote endpoint's /v1/models capabilities."""
    from qwenkit.capabilities import Capabilities, detect_capabilities

    llm = getattr(model, "llm", None)
    if llm is not None:
        llm = getattr(llm, "llm", llm)  # an AsyncLLM's LLM
        caps, name = detect_capabilities(llm.tokenizer), llm.model_name
    else:
        try:
            entry = next(m for m in model.client.models.list().data if m.id == model.model)
            names = (entry.model_extra or {}).get("capabilities")
        except Exception:  # noqa: BLE001 - an endpoint that does not say: assume nothing
            names = None
        if not isinstance(names, list):
            return lambda **_: None
        caps = Capabilities("thinking" in names, "hybrid_thinking" in names, "tools" in names)
        name = model.model

    def note(*, no_think: bool = False, budget: bool = False) -> str | None:
        return caps.thinking_note(name, no_think=no_think, budget=budget)

    return note


def _docs_advisors(args: argparse.Namespace, out: TextIO, style: _Style) -> list[Any]:
    """--docs FOLDER: its files indexed in an in-memory store (BM25), and the advisor that
    puts the best matches in each question's prompt; none without --docs."""
    folder = getattr(args, "docs", None)
    if not folder:
        return []
    from qwenkit.client.retrieval import RetrievalAdvisor, index_folder
    from qwenkit.client.vector_store import VectorStore

    if not Path(folder).expanduser().is_dir():
        raise QwenkitError(f"--docs {folder}: no such folder")
    store = VectorStore(":memory:")
    count = index_folder(store, folder)
    if not count:
        raise QwenkitError(f"--docs {folder}: no text, Markdown or PDF files (.txt, .md, .pdf) in it")
    out.write(f"{style.dim}indexed {count} chunks of {len({d.metadata['source'] for d in store.get()})} files "
              f"from {folder}{style.reset}\n")
    return [RetrievalAdvisor(store)]


def run_chat(args: argparse.Namespace, *, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    from qwenkit.client import ChatClient, MCPToolset, MessageChatMemoryAdvisor, SQLiteChatMemory

    stdin, out = stdin or sys.stdin, out or sys.stdout

    style = _Style(out.isatty() and not os.environ.get("NO_COLOR"))
    db = Path(args.db) if args.db else chat_db()
    db.parent.mkdir(parents=True, exist_ok=True)
    memory = SQLiteChatMemory(db, max_messages=args.max_history)
    if args.resume and args.resume not in memory.conversation_ids():
        raise QwenkitError(f"no conversation {args.resume!r} in {db} (known: "
                           f"{', '.join(memory.conversation_ids()[-5:]) or 'none'})")
    mcp = MCPToolset(args.mcp).start() if args.mcp else None
    try:
        tools = [ShownTool(t, out, style) for t in (mcp.tools if mcp else [])]
        options: dict[str, Any] = {}
        for name in sampling_fields.names_on("cli"):  # the client's names too
            if name != "thinking_budget" and getattr(args, name) is not None:
                options[name] = getattr(args, name)
        advisors = [MessageChatMemoryAdvisor(memory), *_docs_advisors(args, out, style)]
        client = ChatClient(_chat_model(args), default_system=args.system, default_options=options,
                            default_advisors=advisors, default_tools=tools)
        model = client.model
        note = _thinking_note(model)
        session = ChatSession(client, memory, conversation_id=args.resume or new_conversation_id(),
                              enable_thinking=False if args.no_think else None,
                              thinking_budget=args.thinking_budget, out=out, style=style, thinking_note=note)
        startup_note = note(no_think=args.no_think, budget=args.thinking_budget is not None)
        if startup_note:
            sys.stderr.write(f"qwenkit: {startup_note}\n")
        verb = "resumed" if args.resume else "new"
        session.say(f"{verb} conversation {session.conversation_id} (qwenkit chat --resume "
                    f"{session.conversation_id}); /help for commands"
                    + (f"; tools: {', '.join(t.name for t in tools)}" if tools else ""))
        if args.resume:
            session.show_history()
        return _loop(session, stdin, out, style)
    finally:
        if mcp is not None:
            mcp.close()
        memory.close()


def _loop(session: ChatSession, stdin: TextIO, out: TextIO, style: _Style) -> int:
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    while True:
        try:
            if interactive:
                line = input(f"{style.bold}> {style.reset}")
            else:
                out.write("> ")
                out.flush()
                line = stdin.readline()
                if not line:
                    raise EOFError
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            if not session.command(line):
                return 0
            continue
        session.turn(line[1:] if line.startswith("//") else line)
