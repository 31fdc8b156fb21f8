"""What guards the engine: the API key, the body size limit and the request slots."""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import unicodedata
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from starlette.routing import Mount, compile_path
from tokenizers import decoders, normalizers

from qwenkit.server.errors import APIError, bad_request, dashscope_error, openai_error
from qwenkit.server.watch import record_refusal, request_id_of

# Paths anyone may read: probes and the API description.
OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


UNMATCHED_ROUTE = "unmatched"

# Deeper JSON is refused before it is parsed: Python's parser recurses, and how deep it may
# go depends on the process's recursion limit, which libraries raise (torch.compile does).
MAX_JSON_DEPTH = 256
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_NOT_A_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def is_dashscope_path(path: str) -> bool:
    return path.startswith("/api/")


class RouteTable:
    """The app's route templates and their methods, matched against raw paths: metrics label
    a request by its template (or "unmatched"), so random paths cannot grow the label set,
    and a 405 lists the methods the path has. Built on first use, once every route exists,
    from the OpenAPI paths (routers included with prefixes are flattened there) and the
    app's own routes and mounts (the page, the static files, the docs)."""

    def __init__(self, app):
        self.app = app
        self._routes: list[tuple[re.Pattern[str], str, frozenset[str]]] | None = None

    def _load(self) -> list[tuple[re.Pattern[str], str, frozenset[str]]]:
        methods: dict[str, set[str]] = {}
        for path, operations in self.app.openapi().get("paths", {}).items():
            methods.setdefault(path, set()).update(m.upper() for m in operations)
        mounts = []
        for route in self.app.routes:
            if isinstance(route, Mount):
                mounts.append((compile_path(route.path.rstrip("/") + "/{path:path}")[0], route.path, frozenset()))
            elif isinstance(getattr(route, "path", None), str):
                methods.setdefault(route.path, set()).update(getattr(route, "methods", None) or ())
        return [(compile_path(path)[0], path, frozenset(m)) for path, m in methods.items()] + mounts

    def match(self, path: str) -> tuple[str, frozenset[str]]:
        """(the template, its methods) of the route at `path`; ("unmatched", {}) for none."""
        if self._routes is None:
            self._routes = self._load()
        for regex, template, methods in self._routes:
            if regex.match(path):
                return template, methods
        return UNMATCHED_ROUTE, frozenset()


def route_table(app) -> RouteTable:
    """The `RouteTable` of a FastAPI app (one per app)."""
    if getattr(app.state, "route_table", None) is None:
        app.state.route_table = RouteTable(app)
    return app.state.route_table


async def send_error(scope, send, error: APIError) -> None:
    """Answer with `error` in the shape of the route's protocol (from ASGI middleware)."""
    state = scope.setdefault("state", {})
    record_refusal(state, error)
    body = dashscope_error(error, request_id_of(state)) if is_dashscope_path(scope["path"]) else openai_error(error)
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class Guard:
    """ASGI middleware: the API key (Bearer, compared in constant time) and the body size
    limit (413, also for chunked bodies: the body is read here, then replayed)."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = self._check_key(scope) if scope["path"] not in OPEN_PATHS else None
        if error is None:
            error, receive = await self._read_body(scope, receive)
        if error is not None:
            return await send_error(scope, send, error)
        await self.app(scope, receive, send)

    def _check_key(self, scope) -> APIError | None:
        if self.api_key is None:
            return None
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
        if hmac.compare_digest(given, self.api_key):
            return None
        return APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
                        code="invalid_api_key")

    async def _read_body(self, scope, receive) -> tuple[APIError | None, Callable[[], Awaitable[dict[str, Any]]]]:
        too_large = APIError(413, f"the request body is larger than {self.max_body_bytes} bytes",
                             code="request_too_large")
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                return too_large, receive
        if scope["method"] in ("GET", "HEAD"):
            return None, receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, _replay([message], receive)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return too_large, receive
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if json_too_deep(body):
            return APIError(400, f"the request body nests JSON too deeply (more than {MAX_JSON_DEPTH} levels "
                                 "of objects and arrays)"), receive
        return None, _replay([{"type": "http.request", "body": body, "more_body": False}], receive)


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the objects and arrays of a JSON body nest deeper than `limit` (brackets
    inside strings do not count)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False  # the common case, without a scan
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_A_BRACKET)
    steps = np.where(np.isin(np.frombuffer(brackets, np.uint8), (ord("["), ord("{"))), 1, -1)
    return steps.size > 0 and int(np.cumsum(steps).max()) > limit


def _replay(messages: list[dict[str, Any]], receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()
    return replayed


class RequestSlots:
    """At most `max_running` generations at once and `max_waiting` waiting for a turn;
    past that a request is refused with 429 and Retry-After."""

    def __init__(self, max_running: int, max_waiting: int, retry_after_s: int = 1):
        if max_running < 1 or max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self.num_running = 0
        self.num_waiting = 0
        self._semaphore = asyncio.Semaphore(max_running)

    async def acquire(self) -> None:
        if self.num_running >= self.max_running and self.num_waiting >= self.max_waiting:
            raise APIError(429, f"the server is busy ({self.num_running} requests running, {self.num_waiting} "
                                "waiting); retry later", code="rate_limit_exceeded",
                           headers={"Retry-After": str(self.retry_after_s)})
        self.num_waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.num_waiting -= 1
        self.num_running += 1

    def release(self) -> None:
        self.num_running -= 1
        self._semaphore.release()


class PromptSizeCheck:
    """Refuses a prompt that cannot fit the context *before* the engine tokenizes it whole.

    Tokenizing a 4 MB body costs ~330 MB that the allocator keeps afterwards, and a text
    with no place to split ("aaaa...", CJK without punctuation) takes 10-15 s: BPE merges
    one 4 MB word. So a large prompt is checked first, in bounded memory and time:

    1. bytes: no token is longer than the vocabulary's longest (128 bytes for Qwen), so a
       text of more than `max_model_len * longest` bytes cannot fit;
    2. the bytes a text holds: a token wholly inside a text is made of the text's own byte
       values, and the longest such token is often far shorter than 128 bytes (8 for "a"s,
       48 for any non-ASCII text in Qwen's vocabulary), which bounds the count from below;
    3. tokens, counted in windows of `window` characters and stopped as soon as the count
       passes the context. Windows end where the Qwen pre-tokenizer must split anyway
       (after a newline; between a letter or digit and a character that is neither, not
       a combining mark, where NFC changes nothing, outside any special token), so the
       pieces' counts add up to the whole text's (tests/test_server_limits.py checks it on
       random text); a window without such a place counts as its bytes' lower bound (2).

    Only prompts past `min_checked_bytes` are checked; the engine's own exact check (after
    tokenizing, in little memory for small prompts) does the rest.
    """

    # A text inside the chat template may share a token or two with the template text beside it.
    EDGE_TOKENS = 4

    def __init__(self, tokenizer, max_model_len: int, *, min_checked_bytes: int = 64 * 1024, window: int = 16 * 1024):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.min_checked_bytes = min_checked_bytes
        self.window = window
        self._vocabulary: tuple[np.ndarray, np.ndarray] | None = None
        self._longest_within: dict[bytes, int] = {}
        self._special = None

    @property
    def max_token_bytes(self) -> int:
        """The most bytes one token stands for."""
        return int(self._token_bytes()[0].max())

    def warm(self) -> None:
        """Read the vocabulary's token bytes now (~0.5-1 s for Qwen's 151k tokens) rather
        than on the first large prompt, which must be refused at once."""
        self._token_bytes()

    def _token_bytes(self) -> tuple[np.ndarray, np.ndarray]:
        if self._vocabulary is None:
            self._vocabulary = vocabulary_bytes(self.tokenizer.backend)
        return self._vocabulary

    def check(self, texts: list[str]) -> None:
        """Raise a 400 (context_length_exceeded) if `texts`, all part of one prompt, cannot fit."""
        sizes = [len(t.encode("utf-8", "surrogatepass")) for t in texts]
        total = sum(sizes)
        if total <= self.min_checked_bytes:
            return
        if total > self.max_model_len * self.max_token_bytes:
            raise self._too_long(f"the prompt is {total} bytes, more than a {self.max_model_len}-token context can "
                                 f"hold (a token is at most {self.max_token_bytes} bytes)")
        try:
            at_least = sum(self.tokens_inside(text, num_open_edges=2) for text in texts)
        except ValueError as e:  # text the tokenizer refuses (a lone surrogate)
            raise bad_request(e) from e
        if at_least >= self.max_model_len:
            raise self._too_long(f"the prompt is at least {at_least} tokens (counted by its bytes and the longest "
                                 f"tokens they can form), but the model's context is {self.max_model_len} tokens")
        count = 0
        for text, size in zip(texts, sizes):
            if size:
                try:
                    at_least = self.count_at_least(text, self.max_model_len - count + self.EDGE_TOKENS)
                except ValueError as e:
                    raise bad_request(e) from e
                count += max(0, at_least - self.EDGE_TOKENS)
            if count >= self.max_model_len:
                raise self._too_long(f"the prompt is at least {count} tokens, but the model's context is "
                                     f"{self.max_model_len} tokens (and at least one must be left to generate)")

    def count_at_least(self, text: str, stop_after: int) -> int:
        """A lower bound of len(tokenizer.encode(text)), exact when it is at most `stop_after`."""
        count, start, exact = 0, 0, True  # exact: `start` is a place the pre-tokenizer splits
        while start < len(text) and count <= stop_after:
            end = min(len(text), start + self.window)
            cuts = self._cuts(text, start, end) + ([end] if end == len(text) else [])
            if not cuts:  # no safe place: count by bytes, less the tokens that may cross either edge
                count += self.tokens_inside(text[start:end], num_open_edges=2)
                start, exact = end, False
            elif not exact:
                count += self.tokens_inside(text[start:cuts[0]], num_open_edges=1)
                start, exact = cuts[0], True
            else:
                count += len(self.tokenizer.encode(text[start:cuts[-1]]))
                start = cuts[-1]
        return count

    def tokens_inside(self, text: str, *, num_open_edges: int) -> int:
        """At least how many tokens lie wholly inside `text`, a piece of a prompt, when
        tokens may cross `num_open_edges` of its two ends. A token wholly inside is made of
        byte values the (normalized) piece holds, so it is at most `longest` bytes long;
        each open end takes away up to two of the longest tokens' bytes (one that crosses
        it, one that normalization may change beside it)."""
        try:
            data = self._normalized(text).encode("utf-8")
        except UnicodeEncodeError as e:  # as the tokenizer would refuse it
            raise ValueError(f"text is not valid Unicode: {e.reason} at character {e.start}") from None
        longest = self._longest_token_within(data)
        return max(0, -(-(len(data) - 2 * num_open_edges * self.max_token_bytes) // longest))

    def _longest_token_within(self, data: bytes) -> int:
        """The longest token made only of byte values that `data` holds."""
        present = np.bincount(np.frombuffer(data, np.uint8), minlength=256) > 0
        key = np.packbits(present, bitorder="little").tobytes()  # bit b: byte value b
        if key not in self._longest_within:
            lengths, masks = self._token_bytes()
            outside = ~np.frombuffer(key, "<u8")
            fits = ~(masks & outside).any(axis=1)
            self._longest_within[key] = int(lengths[fits].max()) if fits.any() else 1
        return self._longest_within[key]

    def _normalized(self, text: str) -> str:
        normalizer = self.tokenizer.backend.normalizer
        if normalizer is None:
            return text
        if isinstance(normalizer, normalizers.NFC):
            return unicodedata.normalize("NFC", text)  # the same, and ~100x faster on long texts
        return normalizer.normalize_str(text)

    _CANDIDATES = re.compile(r"(?<=[\r\n])(?=\S)|(?<=[^\W_])(?=[\W_])")

    def _cuts(self, text: str, start: int, end: int) -> list[int]:
        """Places in text(start, end) where the Qwen pre-tokenizer splits whatever surrounds them."""
        specials = [(m.start(), m.end()) for m in self._special_tokens().finditer(text, max(0, start - 64), end + 64)]
        cuts = []
        for m in self._CANDIDATES.finditer(text, start + 1, end):
            i = m.start()
            # The tokenizer normalizes (NFC) before it splits: neither side may change there.
            if i > start and not unicodedata.category(text[i]).startswith("M") and \
                    unicodedata.is_normalized("NFC", text[i - 1:i + 1]) and not any(a < i < b for a, b in specials):
                cuts.append(i)
        return cuts

    def _special_tokens(self) -> re.Pattern[str]:
        if self._special is None:
            added = sorted(self.tokenizer.backend.get_added_tokens_decoder().values(), key=lambda t: -len(t.content))
            self._special = re.compile("|".join(re.escape(t.content) for t in added) or "(?!)")
        return self._special

    @staticmethod
    def _too_long(message: str) -> APIError:
        return APIError(400, message, code="context_length_exceeded")


def vocabulary_bytes(backend) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, masks) of a `tokenizers` vocabulary, indexed by token id: each token's
    length in bytes and the byte values it is made of, as four 64-bit words (bit b: byte
    value b). A byte-level BPE token's bytes are read from its own characters (a token that
    is part of a UTF-8 character has no text of its own); other tokens are measured
    decoded, with mask 0 (unknown: they count as made of any bytes)."""
    byte_level = isinstance(backend.decoder, decoders.ByteLevel)
    added = backend.get_added_tokens_decoder()
    vocab = backend.get_vocab(with_added_tokens=True)
    pieces: list[bytes] = [b""] * (max(vocab.values(), default=-1) + 1)
    known = np.zeros(len(pieces), bool)
    for token, token_id in vocab.items():
        if token_id in added:
            pieces[token_id], known[token_id] = added[token_id].content.encode("utf-8", "surrogatepass"), True
            continue
        try:
            if not byte_level:
                raise UnicodeEncodeError("latin-1", token, 0, 0, "not a byte-level vocabulary")
            pieces[token_id], known[token_id] = token.translate(_BYTE_LEVEL_CHARS).encode("latin-1"), True
        except UnicodeEncodeError:
            decoded = backend.decoder.decode([token]) if backend.decoder is not None else token
            pieces[token_id] = decoded.encode("utf-8", "surrogatepass")
    lengths = np.fromiter(map(len, pieces), np.int64, len(pieces))
    data = np.frombuffer(b"".join(p for p, k in zip(pieces, known) if k), np.uint8)
    holds = np.zeros((len(pieces), 256), bool)
    holds[np.repeat(np.flatnonzero(known), lengths[known]), data] = True
    return lengths, np.packbits(holds, axis=1, bitorder="little").view("<u8")


def _byte_level_chars() -> dict[int, int]:
    """GPT-2's byte-level alphabet read back: the character that stands for each byte -> the
    byte; a character below U+0180 outside the alphabet -> U+FFFF (not a byte: the token is
    then measured decoded)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {c: 0xFFFF for c in range(0x180)}
    return {**table, **{b: b for b in printable}, **{256 + i: b for i, b in enumerate(others)}}


_BYTE_LEVEL_CHARS = _byte_level_chars()


def prompt_texts(messages: list[dict[str, Any]]) -> list[str]:
    """The texts of a chat that reach its prompt whole: system, user and tool contents (an
    assistant turn's may be cut by the template, so it is not counted)."""
    return [m["content"] for m in messages
            if m.get("role") in ("system", "user", "tool") and isinstance(m.get("content"), str)]
