"""Constrained decoding: whatever a (random) model picks under the mask is valid output.

The "model" is random logits plus a taste for closing quotes and brackets and for
end-of-turn, so a greedy walk finishes in a few dozen steps instead of writing endless
strings; every token it picks is still chosen by the grammar's mask.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from qwenkit.chat.structured import GrammarCompiler, pack_bitmask, unpack_bitmask
from qwenkit.tokenizer import Tokenizer
from tiny import make_tokenizer

NUM_PADDING = 13  # the tiny "model" has more rows than the tiny tokenizer has tokens

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]


@pytest.fixture(scope="module")
def tiny_compiler(tmp_path_factory) -> GrammarCompiler:
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    make_tokenizer(folder)
    tokenizer = Tokenizer.from_dir(folder)
    return GrammarCompiler(tokenizer, tokenizer.vocab_size + NUM_PADDING)


@pytest.fixture(scope="module")
def qwen_compiler(default_gguf) -> GrammarCompiler:
    from qwenkit.loader.gguf import GGUFCheckpoint

    checkpoint = GGUFCheckpoint(default_gguf)
    tokenizer = Tokenizer(checkpoint.tokenizer_backend(), chat_template=checkpoint.chat_template, **checkpoint.special_tokens())
    return GrammarCompiler(tokenizer, checkpoint.hf_config()["vocab_size"])


@pytest.fixture(params=["tiny", "qwen"])
def compiler(request) -> GrammarCompiler:
    return request.getfixturevalue(f"{request.param}_compiler")


_BONUS_CACHE: dict[int, torch.Tensor] = {}


def _bonus(compiler: GrammarCompiler) -> torch.Tensor:
    """The random model's taste: closers and end-of-turn get a head start."""
    key = id(compiler)
    if key not in _BONUS_CACHE:
        bonus = torch.zeros(compiler.vocab_size)
        tokenizer = compiler.tokenizer
        for token_id in range(tokenizer.vocab_size):
            text = tokenizer.decode([token_id])
            if any(c in text for c in '"}]'):
                bonus[token_id] = 3.0
        bonus[list(compiler.eos_token_ids)] = 6.0
        _BONUS_CACHE[key] = bonus
    return _BONUS_CACHE[key]


def greedy_decode(compiler: GrammarCompiler, grammar, *, seed: int, max_steps: int = 300) -> str:
    """Argmax of random logits under the mask until the grammar completes; the text made."""
    generator = torch.Generator().manual_seed(seed)
    bonus = _bonus(compiler)
    padding = sorted(compiler._padding_ids)
    matcher = grammar.matcher()
    ids: list[int] = []
    for _ in range(max_steps):
        if matcher.is_terminated():
            break
        mask = matcher.allowed_mask()
        assert mask.dtype == torch.bool and mask.shape == (compiler.vocab_size,)
        assert not mask[padding].any()
        logits = torch.randn(compiler.vocab_size, generator=generator) + bonus
        logits[~mask] = float("-inf")
        token_id = int(logits.argmax())
        assert matcher.accept(token_id)
        if token_id in compiler.eos_token_ids:  # the engine ends the turn here
            break
        ids.append(token_id)
    assert matcher.is_terminated(), f"not done after {max_steps} steps: {compiler.tokenizer.decode(ids)!r}"
    end_only = torch.zeros(compiler.vocab_size, dtype=torch.bool)
    end_only[list(compiler.eos_token_ids)] = True
    assert torch.equal(matcher.allowed_mask(), end_only)
    return compiler.tokenizer.decode(ids)


@pytest.mark.parametrize("seed", range(3))
def test_json_object_decodes_to_an_object(compiler, seed):
    text = greedy_decode(compiler, compiler.json_object(), seed=seed)
    assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_output_validates(compiler, seed):
    text = greedy_decode(compiler, compiler.json_schema(SCHEMA), seed=seed)
    jsonschema.validate(json.loads(text), SCHEMA)


def _parse_tool_calls(text: str) -> list[dict]:
    calls = []
    for chunk in text.split("<tool_call>")[1:]:
        body, end, rest = chunk.partition("</tool_call>")
        assert end and rest.strip() == "", text
        calls.append(json.loads(body))
    assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>"), text
    return calls


def _check_call(call: dict) -> None:
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    assert list(call) == ["name", "arguments"]
    jsonschema.validate(call["arguments"], schemas[call["name"]])


@pytest.mark.parametrize("seed", range(3))
def test_tool_calls_required(compiler, seed):
    text = greedy_decode(compiler, compiler.tool_calls(TOOLS), seed=seed)
    calls = _parse_tool_calls(text)
    assert len(calls) >= 1
    for call in calls:
        _check_call(call)


@pytest.mark.parametrize("name", ["get_weather", "add"])
def test_tool_calls_named(compiler, name):
    text = greedy_decode(compiler, compiler.tool_calls(TOOLS, name=name), seed=0)
    [call] = _parse_tool_calls(text)
    assert call["name"] == name
    _check_call(call)


def test_tool_call_markers_are_the_single_tokens(compiler):
    tokenizer = compiler.tokenizer
    matcher = compiler.tool_calls(TOOLS, name="add").matcher()
    allowed = matcher.allowed_mask().nonzero().flatten().tolist()
    assert allowed == [tokenizer.token_to_id("<tool_call>")]
    for token_id in tokenizer.encode('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": -2}}\n'):
        assert matcher.accept(token_id)
    assert matcher.allowed_mask().nonzero().flatten().tolist() == [tokenizer.token_to_id("</tool_call>")]
    assert matcher.accept(tokenizer.token_to_id("</tool_call>"))
    newline = tokenizer.encode("\n")
    assert set(matcher.allowed_mask().nonzero().flatten().tolist()) == {*newline, *compiler.eos_token_ids}
    assert matcher.accept(newline[0])
    assert matcher.is_terminated()


@pytest.mark.parametrize("kwargs, more_calls", [({}, True), ({"parallel": False}, False),
                                                ({"name": "add"}, False)])
def test_tool_calls_may_end_after_the_newline_qwen_writes(qwen_compiler, kwargs, more_calls):
    """Qwen ends a tool-call turn with "</tool_call>\\n" and then end-of-turn: the grammar
    must allow the end there (it used to force another <tool_call>, so `required` never
    stopped), and allow another call only when parallel calls are."""
    tokenizer = qwen_compiler.tokenizer
    matcher = qwen_compiler.tool_calls(TOOLS, **kwargs).matcher()
    for token_id in tokenizer.encode('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'):
        assert matcher.accept(token_id)
    allowed = set(matcher.allowed_mask().nonzero().flatten().tolist())
    call = tokenizer.token_to_id("<tool_call>")
    assert allowed == {*qwen_compiler.eos_token_ids, *([call] if more_calls else [])}


def test_accept_rejects_disallowed_token_and_keeps_state(tiny_compiler):
    tokenizer = tiny_compiler.tokenizer
    matcher = tiny_compiler.json_schema(SCHEMA).matcher()
    before = matcher.allowed_mask()
    for token_id in [tokenizer.encode("a")[0], tiny_compiler.eos_token_ids[0], tiny_compiler.vocab_size - 1, -1, 10**6]:
        assert not before[token_id] if 0 <= token_id < tiny_compiler.vocab_size else True
        assert not matcher.accept(token_id)
    assert torch.equal(matcher.allowed_mask(), before)
    for token_id in tokenizer.encode('{"name'):
        assert matcher.accept(token_id)
    assert not matcher.accept(tokenizer.encode("}")[0])  # inside a key: rejected, not an error state
    assert matcher.accept(tokenizer.encode('"')[0])


def test_padding_tokens_are_never_allowed(tiny_compiler):
    vocab_size, num_tokens = tiny_compiler.vocab_size, tiny_compiler.tokenizer.vocab_size
    matcher = tiny_compiler.json_object().matcher()
    for token_id in tiny_compiler.tokenizer.encode('{"a": "'):  # inside a string almost anything goes
        assert matcher.accept(token_id)
    mask = matcher.allowed_mask()
    assert mask.shape == (vocab_size,) and mask[:num_tokens].sum() > num_tokens // 2
    assert not mask[num_tokens:].any()
    assert not matcher.accept(num_tokens)


def test_qwen_padding_rows_are_never_allowed(qwen_compiler):
    tokenizer = qwen_compiler.tokenizer
    padding = sorted(qwen_compiler._padding_ids)
    # llama.cpp names the ids the HF vocabulary lacks "[PAD<id>]"; Qwen2.5 has 271 of them.
    assert padding and tokenizer.id_to_token(padding[0]) == f"[PAD{padding[0]}]"
    matcher = qwen_compiler.json_object().matcher()
    for token_id in tokenizer.encode('{"a": "'):
        assert matcher.accept(token_id)
    mask = matcher.allowed_mask()
    assert mask.shape == (qwen_compiler.vocab_size,) and not mask[padding].any()
    assert mask.sum() > 100_000


@pytest.mark.parametrize(
    "schema, problem",
    [
        ({"type": "foo"}, "foo"),
        ({"type": "string", "pattern": "(("}, "unclosed group"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
        ({"type": "integer", "minimum": "x"}, "minimum"),
        ([1, 2], "expected an object"),
    ],
)
def test_invalid_schema_is_a_value_error_naming_the_problem(tiny_compiler, schema, problem):
    with pytest.raises(ValueError, match="invalid JSON schema") as info:
        tiny_compiler.json_schema(schema)
    assert problem in str(info.value)


def test_bad_tools_are_value_errors(tiny_compiler):
    with pytest.raises(ValueError, match="'nope', which is not among the tools"):
        tiny_compiler.tool_calls(TOOLS, name="nope")
    with pytest.raises(ValueError, match="non-empty list"):
        tiny_compiler.tool_calls([])
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        tiny_compiler.tool_calls([{"type": "function"}])
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]
    with pytest.raises(ValueError, match="invalid tool parameters schema: .*nope"):
        tiny_compiler.tool_calls(bad)


def test_compiled_grammars_are_cached(tiny_compiler):
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    first = tiny_compiler.json_schema(schema)
    again = tiny_compiler.json_schema(json.loads(json.dumps(schema)))  # equal, not the same dict
    assert again is first
    assert tiny_compiler.json_object() is tiny_compiler.json_object()
    assert tiny_compiler.tool_calls(TOOLS) is tiny_compiler.tool_calls(TOOLS)
    assert tiny_compiler.tool_calls(TOOLS, name="add") is not tiny_compiler.tool_calls(TOOLS)


def test_cache_is_lru(tiny_compiler):
    compiler = GrammarCompiler(tiny_compiler.tokenizer, tiny_compiler.vocab_size, max_cached_grammars=2)
    schemas = [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}} for i in range(3)]
    a, b = compiler.json_schema(schemas[0]), compiler.json_schema(schemas[1])
    assert compiler.json_schema(schemas[0]) is a  # a is now the most recent
    compiler.json_schema(schemas[2])  # evicts b
    assert compiler.json_schema(schemas[0]) is a
    assert compiler.json_schema(schemas[1]) is not b


def test_matchers_are_independent(tiny_compiler):
    grammar = tiny_compiler.json_object()
    first, second = grammar.matcher(), grammar.matcher()
    assert first.accept(tiny_compiler.tokenizer.encode("{")[0])
    assert torch.equal(second.allowed_mask(), grammar.matcher().allowed_mask())
    assert not torch.equal(first.allowed_mask(), second.allowed_mask())


def test_rollback_restores_the_mask(tiny_compiler):
    matcher = tiny_compiler.json_schema(SCHEMA).matcher()
    ids = tiny_compiler.tokenizer.encode('{"name": "Bo", "age": 4')
    for token_id in ids[:5]:
        assert matcher.accept(token_id)
    mask = matcher.allowed_mask()
    for token_id in ids[5:]:
        assert matcher.accept(token_id)
    matcher.rollback(len(ids) - 5)
    assert torch.equal(matcher.allowed_mask(), mask)


def test_fill_bitmask_is_the_packed_mask(tiny_compiler):
    matcher = tiny_compiler.json_object().matcher()
    bitmask = torch.empty(tiny_compiler.num_bitmask_words, dtype=torch.int32)
    matcher.fill_bitmask(bitmask)
    assert torch.equal(unpack_bitmask(bitmask, tiny_compiler.vocab_size), matcher.allowed_mask())
    with pytest.raises(ValueError, match="int32"):
        matcher.fill_bitmask(torch.empty(3, dtype=torch.int32))


def test_pack_unpack_round_trip():
    mask = torch.rand(1000, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.equal(unpack_bitmask(pack_bitmask(mask), 1000), mask)


def test_qwen_mask_allows_each_token_of_a_valid_document(qwen_compiler):
    """On Qwen's real vocabulary (its speed, ~0.1 ms a step, is measured in
    benchmarks/grammar_backends.py, not here: timings fail on loaded CI machines)."""
    matcher = qwen_compiler.json_schema(SCHEMA).matcher()
    for token_id in qwen_compiler.tokenizer.encode('{"name": "Ada", "age": 36, "role": "admin", "address": {"city": "'):
        assert matcher.allowed_mask()[token_id]
        assert matcher.accept(token_id)
