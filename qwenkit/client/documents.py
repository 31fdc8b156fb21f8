"""Documents for retrieval: read text, Markdown and PDF files, and split them into chunks.

A chunk keeps where it came from in its metadata (``source``: the path under the folder
read, ``heading``: the Markdown section, ``page``: the PDF page, ``chunk``: its number in
the file), and its id is ``source#chunk``: indexing a folder again replaces its chunks.
Splitting follows the text's own seams: Markdown headings, then paragraphs, then
sentences, and a long run of words last; neighbouring chunks overlap by a few sentences.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Document", "TEXT_SUFFIXES", "read_documents", "split_markdown", "split_text"]

TEXT_SUFFIXES = (".md", ".markdown", ".txt", ".pdf")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")


@dataclass
class Document:
    """A piece of text to retrieve; `score` is set by a search (higher is closer)."""

    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    id: str | None = None
    score: float | None = None


def split_text(text: str, *, chunk_size: int = 1000, chunk_overlap: int = 150) -> list[str]:
    """Chunks of at most `chunk_size` characters, cut between paragraphs, else sentences,
    else words; each starts with up to `chunk_overlap` characters of the previous one's end."""
    if chunk_size <= 0 or not 0 <= chunk_overlap < chunk_size:
        raise ValueError("chunk_size must be positive and chunk_overlap in [0, chunk_size)")
    pieces = _pieces(text.strip(), chunk_size)
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > chunk_size:
            chunks.append(current)
            tail = _tail(current, chunk_overlap)
            current = f"{tail} {piece}" if tail and len(tail) + 1 + len(piece) <= chunk_size else piece
        else:
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


def _pieces(text: str, size: int) -> list[str]:
    """Paragraphs no longer than `size`, longer ones cut into sentences, then words."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if len(para) <= size:
            out.append(para)
            continue
        for sentence in _SENTENCE_END.split(para):
            while len(sentence) > size:
                cut = sentence.rfind(" ", 0, size)
                cut = cut if cut > 0 else size
                out.append(sentence[:cut].strip())
                sentence = sentence[cut:].strip()
            if sentence:
                out.append(sentence)
    return out


def _tail(chunk: str, size: int) -> str:
    """The last whole sentences of `chunk` within `size` characters (words if none fits)."""
    if size == 0:
        return ""
    sentences = _SENTENCE_END.split(chunk)
    tail = ""
    for s in reversed(sentences):
        if len(s) + len(tail) + 1 > size:
            break
        tail = f"{s} {tail}".strip()
    return tail or chunk[-size:].split(" ", 1)[-1]


def split_markdown(text: str, *, chunk_size: int = 1000, chunk_overlap: int = 150) -> list[tuple[str, str]]:
    """(heading, chunk) pairs: the text cut at its headings, each section split as `split_text`
    does, each chunk led by its section's heading line so that it reads on its own."""
    sections: list[tuple[str, str]] = []
    starts = [(m.start(), m.group(2)) for m in _HEADING.finditer(text)]
    if not starts or starts[0][0] > 0:
        sections.append(("", text[: starts[0][0] if starts else len(text)]))
    for i, (start, title) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        body = text[start:end].split("\n", 1)
        sections.append((title, body[1] if len(body) > 1 else ""))
    out = []
    for title, body in sections:
        room = chunk_size - len(title) - 3 if title else chunk_size
        for chunk in split_text(body, chunk_size=max(room, chunk_overlap + 1), chunk_overlap=chunk_overlap):
            out.append((title, f"# {title}\n{chunk}" if title else chunk))
    return out


def read_documents(path: str | Path, *, chunk_size: int = 1000, chunk_overlap: int = 150) -> list[Document]:
    """The chunks of a file, or of every .md / .markdown / .txt / .pdf file under a folder
    (sorted by path). PDF pages are read with pypdf (the `rag` extra)."""
    root = Path(path).expanduser()
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        base = root
    elif root.is_file():
        files, base = [root], root.parent
    else:
        raise FileNotFoundError(f"{root}: no such file or folder")
    documents = []
    for file in files:
        source = file.relative_to(base).as_posix()
        for i, (text, meta) in enumerate(_chunks(file, chunk_size, chunk_overlap)):
            documents.append(Document(text, {"source": source, "chunk": i, **meta}, id=f"{source}#{i}"))
    return documents


def _chunks(file: Path, chunk_size: int, chunk_overlap: int) -> list[tuple[str, dict[str, Any]]]:
    suffix = file.suffix.lower()
    if suffix == ".pdf":
        from pypdf import PdfReader

        out = []
        for number, page in enumerate(PdfReader(file).pages, start=1):
            for chunk in split_text(page.extract_text() or "", chunk_size=chunk_size, chunk_overlap=chunk_overlap):
                out.append((chunk, {"page": number}))
        return out
    text = file.read_text(encoding="utf-8", errors="replace")
    if suffix in (".md", ".markdown"):
        return [(chunk, {"heading": title} if title else {})
                for title, chunk in split_markdown(text, chunk_size=chunk_size, chunk_overlap=chunk_overlap)]
    return [(chunk, {}) for chunk in split_text(text, chunk_size=chunk_size, chunk_overlap=chunk_overlap)]
