"""OpenAI's chat completions and completions APIs, translated to and from engine calls.

Pure functions and small state objects, no I/O: request JSON (validated by the pydantic
models below) becomes a `ChatCall` (a typed `ChatRequest`) / `CompletionCall`; the
engine's `ChatChunk`s and `SequenceUpdate`s become response and stream-chunk dicts, and
`ChatAnswer` / `CompletionAnswer` write them as a stream or a whole response.

Accepted beyond OpenAI's own fields (as vLLM accepts them): ``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``,
``enable_thinking``, ``thinking_budget`` and ``chat_template_kwargs``. Unknown fields are
ignored, as OpenAI-compatible servers do for the fields SDKs add (``user``, ``store``...).
OpenAI's own ranges hold (``temperature`` 0-2, ``top_p`` 0-1, penalties -2..2, ``n`` >= 1,
``top_logprobs`` 0-20, ``logit_bias`` -100..100): a value outside is a 400 naming the field.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from qwenkit.chat.request import ChatRequest
from qwenkit.chat.types import ChatChunk, ChoiceAccumulator, Usage
from qwenkit.engine.llm_engine import SequenceUpdate, TokenOutput
from qwenkit.multimodal.chat import protocol_content
from qwenkit import sampling_fields as sf
from qwenkit.sampling import SamplingParams
from qwenkit.sampling_fields import MAX_INT32, MAX_LOGIT_BIAS, MAX_N, MAX_TOP_LOGPROBS, json_int
from qwenkit.server.errors import APIError, openai_error


class _Model(BaseModel):
    # Strict: `true` is not the integer 1 nor `1.5` the integer... as the published schema says.
    model_config = ConfigDict(extra="ignore", strict=True)


Count = json_int(0, MAX_INT32)
PositiveCount = json_int(1, MAX_INT32)
TokenId = json_int(0, MAX_INT32)
TopK = json_int(-1, MAX_INT32)
Seed = json_int(-(2**63), 2**63 - 1)
NumChoices = json_int(1, MAX_N)
TopLogprobs = json_int(0, MAX_TOP_LOGPROBS)
StopString = Annotated[str, Field(min_length=1)]


class StreamOptions(_Model):
    include_usage: bool = False


class ChatMessage(_Model):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, reasoning_content... reach the template
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class FunctionSpec(_Model):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Model):
    type: Literal["function"] = "function"
    function: FunctionSpec


class ToolChoiceFunction(_Model):
    name: str = Field(min_length=1)


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(_Model):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class TextFormat(_Model):
    type: Literal["text"]


class JsonObjectFormat(_Model):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(_Model):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")]


def engine_tool_choice(choice: ToolChoice | None) -> str | dict[str, Any]:
    return "auto" if choice is None else choice if isinstance(choice, str) else choice.model_dump()


def engine_response_format(response_format: BaseModel | None) -> dict[str, Any] | None:
    return None if response_format is None else response_format.model_dump(by_alias=True, exclude_none=True)


class _RequestFields(_Model):
    model: str | None = None
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")],
                     Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = None
    stop: StopString | list[StopString] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None


# The sampling fields both routes take, then those chat adds, from the one table
# (qwenkit/sampling_fields.py): their types and ranges are the other surfaces' too.
_SamplingFields = create_model("_SamplingFields", __base__=_RequestFields,
                               **sf.pydantic_fields("completions", skip=("max_tokens",)))
_ChatSamplingFields = create_model("_ChatSamplingFields", __base__=_SamplingFields,
                                   **sf.pydantic_fields("openai", skip=sf.names_on("completions")))
MaxTokens = sf.pydantic_type(sf.BY_NAME["max_tokens"])


class ChatCompletionRequest(_ChatSamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = False
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI's legacy pair, honoured as tools / tool_choice: the answer then carries
    # message.function_call (finish_reason "function_call"), as OpenAI answered them.
    functions: Annotated[list[FunctionSpec], Field(min_length=1)] | None = None
    function_call: Literal["none", "auto"] | ToolChoiceFunction | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None


DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's max_tokens for (legacy) completions, absent or null


class CompletionRequest(_SamplingFields):
    # One prompt: text, token ids, or a batch of one of either (several: 400).
    prompt: (Annotated[str, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=1)])
    max_tokens: MaxTokens | None = DEFAULT_COMPLETION_TOKENS  # null too: OpenAI's legacy default
    logprobs: json_int(0, 5) | None = None  # legacy API: how many top logprobs per token
    echo: Literal[False] = False  # not supported
    suffix: Literal[""] | None = None  # not supported


REQUEST_FIELDS = frozenset(ChatCompletionRequest.model_fields) | frozenset(CompletionRequest.model_fields)


@dataclass(frozen=True)
class ChatCall:
    """A chat completion request: the engine's request, and whether a stream ends with usage."""

    request: ChatRequest
    include_usage: bool = False
    functions: bool = False  # the request used the legacy functions / function_call


@dataclass
class CompletionCall:
    """A raw completion: the prompt (text or ids) and its sampling parameters."""

    prompt: str | list[int]
    params: SamplingParams
    include_usage: bool = False


def _sampling(req: Any, *, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> SamplingParams:
    return SamplingParams(
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, logit_bias=req.logit_bias, seed=req.seed,
        n=1 if req.n is None else req.n, max_tokens=max_tokens, min_tokens=req.min_tokens or 0, stop=req.stop,
        stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
        logprobs=logprobs, top_logprobs=top_logprobs,
    )


def chat_call(req: ChatCompletionRequest) -> ChatCall:
    """The engine call a chat request asks for. ValueError (a 400) names a bad field."""
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = _sampling(req, max_tokens=max_tokens, logprobs=bool(req.logprobs),
                       top_logprobs=0 if req.top_logprobs is None else req.top_logprobs)
    # vLLM's clients switch thinking through chat_template_kwargs; the request's own fields win.
    template_kwargs = dict(req.chat_template_kwargs or {})
    enable_thinking = template_kwargs.pop("enable_thinking", None)
    thinking_budget = template_kwargs.pop("thinking_budget", None)
    if req.enable_thinking is not None:
        enable_thinking = req.enable_thinking
    if req.thinking_budget is not None:
        thinking_budget = req.thinking_budget
    tools, tool_choice, parallel = req.tools, req.tool_choice, req.parallel_tool_calls
    functions = req.functions is not None or req.function_call is not None
    if functions:
        tools, tool_choice, parallel = legacy_tools(req)
    request = ChatRequest(
        normalize_messages(req.messages), params,
        enable_thinking=True if enable_thinking is None else enable_thinking,
        thinking_budget=thinking_budget,
        tools=[t.model_dump(exclude_none=True) for t in tools] if tools else None,
        tool_choice=engine_tool_choice(tool_choice),
        parallel_tool_calls=True if parallel is None else parallel,
        response_format=engine_response_format(req.response_format),
        chat_template_kwargs=template_kwargs,
    )
    return ChatCall(request, bool(req.stream_options and req.stream_options.include_usage), functions)


def legacy_tools(req: ChatCompletionRequest) -> tuple[list[Tool], ToolChoice | None, bool]:
    """tools, tool_choice and parallel_tool_calls for the legacy ``functions`` /
    ``function_call`` (one call at most, as the legacy API answers one)."""
    if req.tools is not None or req.tool_choice is not None:
        raise ValueError("functions and function_call (the legacy fields) cannot be combined with tools or "
                         "tool_choice: send one pair")
    if req.functions is None:
        raise ValueError("function_call needs functions")
    choice = req.function_call
    named = NamedToolChoice(function=choice) if isinstance(choice, ToolChoiceFunction) else choice
    return [Tool(function=f) for f in req.functions], named, False


def normalize_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template takes them: text parts joined, ``developer`` as
    ``system``, ``content: null`` (beside tool calls) as an empty string."""
    out = []
    for i, message in enumerate(messages):
        m = message.model_dump(exclude_none=True)
        if m["role"] == "developer":
            m["role"] = "system"
        _legacy_function_message(m, i)
        content = message.content
        if isinstance(content, list):
            # Text parts joined; with image parts (data: URLs), the parts kept for the VL template.
            content = protocol_content(content, f"messages[{i}].content")
        m["content"] = content or ""
        out.append(m)
    return out


def _legacy_function_message(m: dict[str, Any], i: int) -> None:
    """A legacy turn as the template takes it: an assistant's ``function_call`` as its one
    tool call, a ``function`` message (its result) as a ``tool`` message."""
    call = m.pop("function_call", None)
    if call is not None and m["role"] == "assistant" and "tool_calls" not in m:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ValueError(f"messages[{i}].function_call must be {{'name': ..., 'arguments': ...}}")
        m["tool_calls"] = [{"id": f"call_{i}", "type": "function",
                            "function": {"name": call["name"], "arguments": call.get("arguments", "{}")}}]
    if m["role"] == "function":
        m["role"] = "tool"


def completion_call(req: CompletionRequest) -> CompletionCall:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise ValueError("prompt: a batch of several prompts is not supported; send one request per prompt")
        prompt = prompt[0]
    if not prompt:
        raise ValueError("prompt must not be empty")
    if req.echo:
        raise ValueError("echo is not supported")
    if req.suffix:
        raise ValueError("suffix is not supported")
    if req.logprobs is not None and not 0 <= req.logprobs <= 5:
        raise ValueError(f"logprobs must be in [0, 5], got {req.logprobs}")
    max_tokens = DEFAULT_COMPLETION_TOKENS if req.max_tokens is None else req.max_tokens
    params = _sampling(req, max_tokens=max_tokens, logprobs=req.logprobs is not None,
                       top_logprobs=req.logprobs or 0)
    return CompletionCall(prompt, params, bool(req.stream_options and req.stream_options.include_usage))


# -- responses -----------------------------------------------------------------------


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event as OpenAI writes them."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


SSE_DONE = sse("[DONE]")


def chat_logprobs(tokens: list[TokenOutput], decode) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``.

    ``decode`` turns a token id into its text. A token the server forced rather than
    sampled (closing thinking at the thinking budget) has no logprob of its own: it is
    reported with logprob 0.0 and no top logprobs."""

    def entry(token_id: int, logprob: float | None) -> dict[str, Any]:
        text = decode(token_id)
        return {"token": text, "logprob": 0.0 if logprob is None else logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for t in tokens:
        item = entry(t.token_id, t.logprob)
        item["top_logprobs"] = [entry(i, lp) for i, lp in (t.top_logprobs or [])]
        content.append(item)
    return {"content": content}


def token_decoder(decode_ids) -> Any:
    """A memoized ``id -> text`` from a tokenizer's ``decode(list[int])``."""
    cache: dict[int, str] = {}

    def decode(token_id: int) -> str:
        text = cache.get(token_id)
        if text is None:
            text = cache[token_id] = decode_ids([token_id])
        return text

    return decode


def _delta_dict(chunk: ChatChunk) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if chunk.delta.reasoning_content:
        # `reasoning_content` for DeepSeek-style clients, `reasoning` for newer vLLM ones.
        delta["reasoning_content"] = chunk.delta.reasoning_content
        delta["reasoning"] = chunk.delta.reasoning_content
    if chunk.delta.content:
        delta["content"] = chunk.delta.content
    if chunk.delta.tool_calls:
        delta["tool_calls"] = [t.to_openai() for t in chunk.delta.tool_calls]
    return delta


@dataclass
class ChatStreamEncoder:
    """Engine chunks -> ``chat.completion.chunk`` dicts for one request. ``decode`` (token
    id -> text) is needed when the request asked for logprobs."""

    id: str
    model: str
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    decode: Any = None
    _started: set[int] = field(default_factory=set)

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": choices}
        if self.include_usage:
            out["usage"] = usage
        return out

    def encode(self, chunk: ChatChunk) -> list[dict[str, Any]]:
        """The chunks to send for one engine chunk (none when it adds nothing)."""
        out = []
        if chunk.index not in self._started:
            self._started.add(chunk.index)
            out.append(self._chunk([{"index": chunk.index, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]))
        delta = _delta_dict(chunk)
        logprobs = chat_logprobs(chunk.logprobs, self.decode) if chunk.logprobs else None
        if delta or logprobs or chunk.finish_reason is not None:
            out.append(self._chunk([{"index": chunk.index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": chunk.finish_reason}]))
        if chunk.usage is not None and self.include_usage:
            out.append(self._chunk([], usage=chunk.usage.to_openai()))
        return out


@dataclass
class ChatAccumulator:
    """Gathers a request's engine chunks (all n choices) into one ``chat.completion``.
    ``decode`` (token id -> text) is needed when the request asked for logprobs."""

    choices: dict[int, ChoiceAccumulator] = field(default_factory=dict)
    usage: Usage | None = None
    decode: Any = None

    def add(self, chunk: ChatChunk) -> None:
        self.choices.setdefault(chunk.index, ChoiceAccumulator()).add(chunk)
        if chunk.usage is not None:
            self.usage = chunk.usage

    def response(self, *, id: str, model: str, created: int | None = None) -> dict[str, Any]:
        choices = []
        for index in sorted(self.choices):
            c = self.choices[index]
            reasoning, content = (text or None for text in c.texts())
            message: dict[str, Any] = {"role": "assistant", "content": content,
                                       "reasoning_content": reasoning, "reasoning": reasoning}
            if c.tool_calls:
                message["tool_calls"] = [call.to_openai() for call in c.tool_calls.calls()]
            logprobs = chat_logprobs(c.logprobs, self.decode) if c.logprobs is not None else None
            choices.append({"index": index, "message": message, "logprobs": logprobs,
                            "finish_reason": c.finish_reason or "stop"})
        usage = self.usage or Usage(0, 0)
        return {"id": id, "object": "chat.completion", "created": created or int(time.time()), "model": model,
                "choices": choices, "usage": usage.to_openai()}


def _completion_logprobs(update: SequenceUpdate, decode, offset: int) -> dict[str, Any]:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for t in update.outputs:
        tokens.append(t.text)
        token_logprobs.append(t.logprob)
        top.append({decode(i): lp for i, lp in (t.top_logprobs or [])} or None)
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


@dataclass
class CompletionEncoder:
    """Engine updates -> ``text_completion`` dicts (stream chunks or one response).

    ``decode`` turns a token id into its text, for the top logprobs' keys."""

    id: str
    model: str
    decode: Any = None
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    texts: dict[int, list[str]] = field(default_factory=dict)
    finish_reasons: dict[int, str] = field(default_factory=dict)
    logprobs: dict[int, dict[str, list]] = field(default_factory=dict)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_generated: int = 0

    def add(self, update: SequenceUpdate) -> dict[str, Any] | None:
        """Record an update; returns its stream chunk (None when it adds nothing)."""
        text = "".join(t.text for t in update.outputs)
        pieces = self.texts.setdefault(update.index, [])
        offset = sum(map(len, pieces))
        pieces.append(text)
        self.num_prompt_tokens = update.num_prompt_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, update.num_cached_tokens)
        self.num_generated += len(update.outputs)
        logprobs = None
        if self.decode is not None and update.outputs and update.outputs[0].logprob is not None:
            logprobs = _completion_logprobs(update, self.decode, offset)
            total = self.logprobs.setdefault(update.index, {k: [] for k in logprobs})
            for key, values in logprobs.items():
                total[key].extend(values)
        finish = None
        if update.finish_reason is not None:
            finish = "stop" if update.finish_reason == "abort" else update.finish_reason
            self.finish_reasons[update.index] = finish
        if not text and finish is None:
            return None
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
               "choices": [{"index": update.index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage(self) -> dict[str, Any]:
        return Usage(self.num_prompt_tokens, self.num_generated, cached_tokens=self.num_cached_tokens).to_openai()

    def usage_chunk(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}

    def response(self) -> dict[str, Any]:
        choices = [
            {"index": i, "text": "".join(self.texts[i]), "logprobs": self.logprobs.get(i),
             "finish_reason": self.finish_reasons.get(i, "stop")}
            for i in sorted(self.texts)
        ]
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}


class ChatAnswer:
    """A chat completion written as `chat.completion.chunk` events or as one
    `chat.completion` (see `qwenkit.server.respond.Answer`); with ``functions`` (the
    request used the legacy fields), a call is written as the legacy ``function_call``."""

    def __init__(self, request_id: str, model: str, *, include_usage: bool, decode: Any = None,
                 functions: bool = False):
        self.request_id, self.model = request_id, model
        self.stream = ChatStreamEncoder(request_id, model, include_usage, decode=decode)
        self.accumulator = ChatAccumulator(decode=decode)
        self.functions = functions

    def start(self) -> list[bytes]:
        return []

    def events(self, chunk: ChatChunk) -> list[bytes]:
        out = self.stream.encode(chunk)
        return [sse(legacy_function_call(c, "delta") if self.functions else c) for c in out]

    def fail(self, error: APIError) -> list[bytes]:
        return [sse(openai_error(error)), SSE_DONE]

    async def end(self) -> list[bytes]:
        return [SSE_DONE]

    def add(self, chunk: ChatChunk) -> None:
        self.accumulator.add(chunk)

    async def whole(self) -> dict[str, Any]:
        response = self.accumulator.response(id=self.request_id, model=self.model)
        return legacy_function_call(response, "message") if self.functions else response


def legacy_function_call(body: dict[str, Any], key: str) -> dict[str, Any]:
    """A chat completion (``key`` "message") or chunk ("delta") with its tool call written
    as the legacy ``function_call`` and finish_reason ``function_call``."""
    for choice in body["choices"]:
        calls = choice[key].pop("tool_calls", None)
        if calls:
            function = calls[0]["function"]
            choice[key]["function_call"] = {k: v for k, v in function.items() if v is not None}
        if choice.get("finish_reason") == "tool_calls":
            choice["finish_reason"] = "function_call"
    return body


class CompletionAnswer:
    """A text completion written as `text_completion` events or as one response."""

    def __init__(self, encoder: CompletionEncoder):
        self.encoder = encoder

    def start(self) -> list[bytes]:
        return []

    def events(self, update: SequenceUpdate) -> list[bytes]:
        out = self.encoder.add(update)
        return [] if out is None else [sse(out)]

    def fail(self, error: APIError) -> list[bytes]:
        return [sse(openai_error(error)), *self._last()]

    async def end(self) -> list[bytes]:
        return self._last()

    def _last(self) -> list[bytes]:
        return [*([sse(self.encoder.usage_chunk())] if self.encoder.include_usage else []), SSE_DONE]

    def add(self, update: SequenceUpdate) -> None:
        self.encoder.add(update)

    async def whole(self) -> dict[str, Any]:
        return self.encoder.response()


DEFAULT_MODEL = "default"  # accepted for the served model, as `qwenkit run --model default` is


class ModelCard(_Model):
    """One entry of ``/v1/models``; ``root`` is the served model an alias stands for."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwenkit"
    root: str
    max_model_len: int
    # What the model can do ("completion", "thinking", "hybrid_thinking", "tools"; see
    # qwenkit.capabilities), as Ollama reports them.
    capabilities: list[str]


class ModelList(_Model):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def model_card(name: str, *, served: str, max_model_len: int, created: int,
               capabilities: list[str] | None = None) -> ModelCard:
    return ModelCard(id=name, created=created, root=served, max_model_len=max_model_len,
                     capabilities=capabilities or ["completion"])


def models_response(names: list[str], *, served: str, max_model_len: int, created: int,
                    capabilities: list[str] | None = None) -> ModelList:
    return ModelList(data=[model_card(n, served=served, max_model_len=max_model_len, created=created,
                                      capabilities=capabilities) for n in names])
