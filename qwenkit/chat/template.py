"""Chat templates are rendered by :mod:`qwenkit.chat_template`, beside the tokenizer that holds
one (`Tokenizer.apply_chat_template`), so that the tokenizer never imports up into the chat
package; the names stay importable from here."""

from qwenkit.chat_template import ChatTemplate, qwen3_template

__all__ = ["ChatTemplate", "qwen3_template"]
