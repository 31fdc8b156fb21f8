"""The Qwen tokenizer: Hugging Face ``tokenizers`` plus the checkpoint's chat template.

Loads what transformers writes (``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``) and encodes, decodes and renders chats with the same results as
``transformers.AutoTokenizer``. :class:`IncrementalDetokenizer` turns a stream of
generated ids into text pieces that never split a UTF-8 character. No torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from qwenkit.chat_template import ChatTemplate, qwen3_template
from qwenkit.errors import ModelLoadError

_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """Text <-> token ids for one checkpoint, and its chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        """``chat_template`` None means the built-in Qwen3 template."""
        self.backend = backend
        self.chat_template = ChatTemplate(qwen3_template() if chat_template is None else chat_template)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.bos_token_id = self._special_token_id("bos_token", bos_token)
        self.eos_token_id = self._special_token_id("eos_token", eos_token)
        self.pad_token_id = self._special_token_id("pad_token", pad_token)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer folder (what ``save_pretrained`` writes)."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"no tokenizer.json in {path}: qwenkit needs a fast (tokenizers) tokenizer file")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ModelLoadError(f"cannot read {tokenizer_file}: {e}") from e
        config = _read_json(path / "tokenizer_config.json")
        return cls(
            backend,
            chat_template=_find_chat_template(path, config),
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            pad_token=_token_content(config.get("pad_token")),
        )

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text``; special-token text such as ``<|im_start|>`` becomes its id.
        No BOS is added (Qwen uses none). Raises ValueError for text that is not valid
        Unicode (a lone surrogate, as JSON's "\\ud800" can carry)."""
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:
            if not isinstance(text, str):
                raise
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"text is not valid Unicode: {e.reason} at character {e.start}") from None
            raise

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.backend.id_to_token(id)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tokenize: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """The prompt for ``messages`` as text, or as ids with ``tokenize=True``.

        Like transformers, the template also sees ``bos_token``/``eos_token``/``pad_token``
        (keyword arguments override them).
        """
        special_tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        special_tokens = {name: token for name, token in special_tokens.items() if token is not None}
        text = self.chat_template.render(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            **{**special_tokens, **template_kwargs},
        )
        return self.encode(text) if tokenize else text

    def _special_token_id(self, name: str, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ModelLoadError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        return token_id


class IncrementalDetokenizer:
    """Generated ids in, newly completed text out, one token at a time.

    Concatenating every :meth:`add` result and :meth:`flush` gives exactly
    ``tokenizer.decode(ids)``. A byte-level token can end inside a multi-byte UTF-8
    character (emoji, CJK); that text is held back until the character completes, so a
    piece never ends in a stray replacement character.

    Each step decodes only a short window: ids from ``prefix_offset`` (text already
    emitted, kept as context for the decoder) up to the end, and compares it with the
    decoded prefix ``[prefix_offset, read_offset)`` to find what is new.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completes (often "", never a partial character)."""
        self.ids.append(token_id)
        prefix_text, new_text = self._decode_window()
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._advance(new_text[len(prefix_text):])

    def flush(self) -> str:
        """Whatever is still held back (an unfinished byte sequence decodes to U+FFFD)."""
        prefix_text, new_text = self._decode_window()
        return self._advance(new_text[len(prefix_text):])

    def _decode_window(self) -> tuple[str, str]:
        skip = self.skip_special_tokens
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip)
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=skip)
        return prefix_text, new_text

    def _advance(self, piece: str) -> str:
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return piece


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def _find_chat_template(path: Path, config: dict) -> str | None:
    """The folder's chat template: ``chat_template.jinja`` (newer transformers), then a
    processor's ``chat_template.json`` (Qwen2.5-VL ships its image-aware template there), win
    over ``tokenizer_config.json``'s ``chat_template``, a string or a list of {name, template}."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = path / "chat_template.json"
    if json_file.is_file():
        from qwenkit.config import read_json

        template = read_json(json_file).get("chat_template")
        if isinstance(template, str):
            return template
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    named = {entry["name"]: entry["template"] for entry in template}
    if "default" not in named:
        raise ModelLoadError(
            f"{path / 'tokenizer_config.json'} has chat templates {sorted(named)} but none named 'default'"
        )
    return named["default"]


def _token_content(token: str | dict | None) -> str | None:
    # tokenizer_config.json writes special tokens either as plain strings or as
    # serialized AddedToken dicts: {"content": "<|im_end|>", "lstrip": false, ...}.
    if isinstance(token, dict):
        return token.get("content")
    return token
