"""Chat on a Qwen model: everything between a conversation and the engine's tokens.

* :mod:`~qwenkit.chat.request`: a chat request, typed and checked once (`ChatRequest`).
* :mod:`~qwenkit.chat.types`: what a chat request returns (completions, stream chunks).
* :mod:`~qwenkit.chat.template`: chat templates rendered as transformers renders them.
* :mod:`~qwenkit.chat.markers`: the marker and whitespace token ids the protocol is read on.
* :mod:`~qwenkit.chat.thinking`: thinking on or off, where it is in a sequence
  (`ThinkingState`), and the thinking budget.
* :mod:`~qwenkit.chat.prepare`: a request made ready for the engine (prompt, controls, parsers).
* :mod:`~qwenkit.chat.stream`: the engine's updates turned back into chunks and completions.
* :mod:`~qwenkit.chat.output_parser` and :mod:`~qwenkit.chat.text_tool_calls`: output split
  into reasoning, answer and tool calls.
* :mod:`~qwenkit.chat.structured`: grammars for structured output and forced tool calls.

Importing this package imports nothing: the client imports :mod:`~qwenkit.chat.types`
without torch.
"""
