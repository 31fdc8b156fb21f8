"""STUB (helper B fills this in): the Qwen tokenizer over Hugging Face `tokenizers`."""

from __future__ import annotations


class Tokenizer:
    def __init__(self, backend, *, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None):
        raise NotImplementedError
