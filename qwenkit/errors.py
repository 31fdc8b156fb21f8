"""Errors a user can act on.

Anything raised as :class:`QwenkitError` is printed by the CLI as one line, without a
traceback: its message must name what was wrong and, where possible, what to do.
"""


class QwenkitError(Exception):
    """A problem with the user's input or environment (not a bug in qwenkit)."""


class ModelLoadError(QwenkitError):
    """A model path, file or checkpoint that cannot be loaded."""


class ContextLengthError(QwenkitError, ValueError):
    """A prompt (plus the tokens asked for) that does not fit the model's context."""
