"""Tokenizer parity with transformers.AutoTokenizer on real Qwen vocabularies, made offline.

The Qwen2.5 folder is transformers' own tokenizer for the default GGUF, saved with
``save_pretrained``. The Qwen3 folder is built from it the way Qwen3's tokenizer is: the
Qwen2.5 BPE vocabulary (151,643 tokens), its 22 special tokens, then four non-special
added tokens ``<tool_response>``, ``</tool_response>``, ``<think>``, ``</think>``.
"""

import json

import pytest
import tokenizers

from qwenkit.chat.template import qwen3_template
from qwenkit.errors import ModelLoadError
from qwenkit.tokenizer import IncrementalDetokenizer, Tokenizer

QWEN_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
}
QWEN3_ADDED_IDS = {"<tool_response>": 151665, "</tool_response>": 151666, "<think>": 151667, "</think>": 151668}
QWEN2_BPE_VOCAB_SIZE = 151643

MIXED_TEXTS = [
    "Hello, world! The quick brown fox jumps over 13 lazy dogs in 2024.",
    "你好，世界！今天天气很好，我们去公园散步吧。机器学习 (machine learning) 很有趣。",
    "def fib(n: int) -> int:\n\tif n < 2:\n\t\treturn n\n    return fib(n - 1) + fib(n - 2)  # O(2^n)\n",
    "emoji 🤖🎉👨‍👩‍👧‍👦 flags 🇨🇳🇺🇸 skin 👍🏽 and math ∑∫√ naïve café Ünïcödé",
    "runs of spaces:     five, tabs:\t\t\ttwo, newlines:\n\n\n\nand CRLF\r\n\r\nend   \n   ",
    "numbers 3.14159 1,000,000 -42 0x1F 1e-9 ١٢٣ 一二三",
    "".join(QWEN_SPECIAL_IDS) + "".join(QWEN3_ADDED_IDS),
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n写一个函数<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n想一想……\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>"
    "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|><|endoftext|>",
    "<think>no space</think>x<think> spaced </think> <|im_end|>trailing",
]

CHAT = [
    {"role": "system", "content": "你是一个编程助手。"},
    {"role": "user", "content": "What's the weather in 北京? 🌧️"},
    {
        "role": "assistant",
        "content": "<think>\nCall the tool.\n</think>\n\n",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}],
    },
    {"role": "tool", "content": '{"temp": 18, "sky": "小雨"}'},
    {"role": "assistant", "content": "It is 18°C with light rain in 北京."},
    {"role": "user", "content": "Thanks!\n\tBye   now"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "天气查询",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.fixture(scope="session")
def qwen25_dir(hf_gguf_tokenizer, tmp_path_factory):
    hf = hf_gguf_tokenizer
    path = tmp_path_factory.mktemp("qwen25_tokenizer")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def qwen3_dir(qwen25_dir, tmp_path_factory):
    data = json.loads((qwen25_dir / "tokenizer.json").read_text(encoding="utf-8"))
    # The GGUF pads its vocabulary to the embedding size with [PAD...] entries and lists the
    # special tokens in it too; a Hugging Face Qwen tokenizer.json holds the BPE tokens only.
    data["model"]["vocab"] = {token: i for token, i in data["model"]["vocab"].items() if i < QWEN2_BPE_VOCAB_SIZE}
    data["normalizer"] = {"type": "NFC"}  # as in Qwen's own tokenizer.json
    backend = tokenizers.Tokenizer.from_str(json.dumps(data))
    backend.add_tokens([tokenizers.AddedToken(token, special=False, normalized=False) for token in QWEN3_ADDED_IDS])
    assert {token: backend.token_to_id(token) for token in QWEN3_ADDED_IDS} == QWEN3_ADDED_IDS

    path = tmp_path_factory.mktemp("qwen3_tokenizer")
    backend.save(str(path / "tokenizer.json"))
    added_tokens_decoder = {
        str(i): {"content": token.content, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": token.special}
        for i, token in backend.get_added_tokens_decoder().items()
    }
    config = {
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": None,
        # Some checkpoints write special tokens as serialized AddedTokens.
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True},
        "pad_token": "<|endoftext|>",
        "chat_template": qwen3_template(),
        "model_max_length": 131072,
        "tokenizer_class": "Qwen2Tokenizer",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    # Qwen3 stops on either end token; the model's generation config, not the tokenizer, says so.
    generation_config = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}
    (path / "generation_config.json").write_text(json.dumps(generation_config))
    return path


@pytest.fixture(scope="session", params=["qwen25", "qwen3"])
def tokenizer_pair(request):
    """(qwenkit Tokenizer, transformers tokenizer) loaded from the same folder."""
    transformers = pytest.importorskip("transformers")
    path = request.getfixturevalue(f"{request.param}_dir")
    return Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session")
def qwen3_tokenizer(qwen3_dir):
    return Tokenizer.from_dir(qwen3_dir)


def test_qwen3_folder_layout(qwen3_tokenizer):
    tokenizer = qwen3_tokenizer
    assert tokenizer.vocab_size == 151669
    for token, token_id in {**QWEN_SPECIAL_IDS, **QWEN3_ADDED_IDS}.items():
        assert tokenizer.token_to_id(token) == token_id
        assert tokenizer.id_to_token(token_id) == token
        assert tokenizer.encode(token) == [token_id]
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == (None, None)
    assert tokenizer.chat_template.source == qwen3_template()
    assert tokenizer.token_to_id("<not a token>") is None
    assert tokenizer.id_to_token(10**7) is None


def test_qwen25_folder_layout(qwen25_dir):
    tokenizer = Tokenizer.from_dir(qwen25_dir)
    for token, token_id in QWEN_SPECIAL_IDS.items():
        assert tokenizer.encode(token) == [token_id]
    assert tokenizer.eos_token_id == 151645
    # save_pretrained wrote the GGUF's own (Qwen2.5) template to chat_template.jinja
    assert tokenizer.chat_template.source == (qwen25_dir / "chat_template.jinja").read_text(encoding="utf-8")


def test_encode_decode_match_transformers(tokenizer_pair):
    tokenizer, hf = tokenizer_pair
    assert tokenizer.vocab_size == len(hf)
    assert tokenizer.eos_token_id == hf.eos_token_id
    assert tokenizer.pad_token_id == hf.pad_token_id
    assert tokenizer.bos_token_id == hf.bos_token_id
    for text in MIXED_TEXTS:
        ids = tokenizer.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        for skip in (False, True):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    assert tokenizer.decode(tokenizer.encode(MIXED_TEXTS[3])) == MIXED_TEXTS[3]


def test_special_token_ids_in_mixed_text(qwen3_tokenizer):
    ids = qwen3_tokenizer.encode(MIXED_TEXTS[7])
    assert set(QWEN_SPECIAL_IDS.values()) | set(QWEN3_ADDED_IDS.values()) <= set(ids)
    # <think> is not special: skipping special tokens keeps it
    text = qwen3_tokenizer.decode(ids, skip_special_tokens=True)
    assert "<think>" in text and "<tool_response>" in text and "<|im_start|>" not in text


def test_apply_chat_template_matches_transformers(tokenizer_pair):
    tokenizer, hf = tokenizer_pair
    for kwargs in ({}, {"enable_thinking": False}, {"tools": TOOLS}, {"tools": TOOLS, "add_generation_prompt": False}):
        hf_kwargs = {"add_generation_prompt": True, **kwargs}
        expected_text = hf.apply_chat_template(CHAT, tokenize=False, **hf_kwargs)
        assert tokenizer.apply_chat_template(CHAT, **kwargs) == expected_text
        expected_ids = hf.apply_chat_template(CHAT, tokenize=True, return_dict=False, **hf_kwargs)
        assert tokenizer.apply_chat_template(CHAT, tokenize=True, **kwargs) == list(expected_ids)


def _stream(tokenizer, ids, **kwargs):
    detokenizer = IncrementalDetokenizer(tokenizer, **kwargs)
    pieces = [detokenizer.add(token_id) for token_id in ids]
    pieces.append(detokenizer.flush())
    return pieces, detokenizer


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_incremental_detokenizer_matches_decode(qwen3_tokenizer, skip_special_tokens):
    tokenizer = qwen3_tokenizer
    for text in MIXED_TEXTS:
        ids = tokenizer.encode(text)
        pieces, detokenizer = _stream(tokenizer, ids, skip_special_tokens=skip_special_tokens)
        full = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(pieces) == full, text
        assert not any("\ufffd" in piece for piece in pieces), (text, pieces)
        assert len(detokenizer.ids) - detokenizer.prefix_offset <= 8  # decodes a window, not the history


def test_incremental_detokenizer_holds_back_partial_characters(qwen3_tokenizer):
    tokenizer = qwen3_tokenizer
    text = "🤖你好👨‍👩‍👧‍👦龘"
    ids = tokenizer.encode(text)
    # The test is only meaningful if some characters really are split across byte-level tokens.
    assert any(tokenizer.decode([token_id]).endswith("\ufffd") for token_id in ids)
    pieces, _ = _stream(tokenizer, ids)
    assert "".join(pieces) == text
    assert "" in pieces[:-1]  # something was held back
    assert not any("\ufffd" in piece for piece in pieces)

    # A stream cut inside a character: flush gives what decode gives.
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    pieces, _ = _stream(tokenizer, ids[:cut])
    assert "".join(pieces) == tokenizer.decode(ids[:cut])
    assert not any("\ufffd" in piece for piece in pieces[:-1])


# Folder-parsing rules, on a tiny word-level tokenizer (no model needed).


def _tiny_dir(path, config=None, jinja=None):
    path.mkdir()
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "hi": 1, "there": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<|endoftext|>", "<|im_end|>"])
    backend.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (path / "chat_template.jinja").write_text(jinja)
    return path


def test_from_dir_without_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_template_sources(tmp_path):
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    config = {"chat_template": named, "eos_token": {"content": "<|im_end|>"}}
    tokenizer = Tokenizer.from_dir(_tiny_dir(tmp_path / "named", config))
    assert tokenizer.chat_template.source == "DEFAULT"
    assert tokenizer.eos_token_id == 4
    assert tokenizer.apply_chat_template([]) == "DEFAULT"

    config = {"chat_template": "FROM CONFIG"}
    tokenizer = Tokenizer.from_dir(_tiny_dir(tmp_path / "file", config, jinja="{{ eos_token }}FROM FILE"))
    assert tokenizer.chat_template.source == "{{ eos_token }}FROM FILE"
    assert tokenizer.eos_token is None

    tokenizer = Tokenizer.from_dir(_tiny_dir(tmp_path / "none", {"eos_token": "<|im_end|>"}))
    assert tokenizer.chat_template.source == qwen3_template()  # no template anywhere: the built-in one
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, enable_thinking=False)
    assert ids == tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_from_dir_rejects_bad_configs(tmp_path):
    with pytest.raises(ModelLoadError, match="none named 'default'"):
        Tokenizer.from_dir(_tiny_dir(tmp_path / "named", {"chat_template": [{"name": "tool_use", "template": "x"}]}))
    with pytest.raises(ModelLoadError, match="eos_token '<eos>' is not in"):
        Tokenizer.from_dir(_tiny_dir(tmp_path / "eos", {"eos_token": "<eos>"}))
    (_tiny_dir(tmp_path / "broken") / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path / "broken")


def test_template_kwargs_override_special_tokens(tmp_path):
    tokenizer = Tokenizer(
        tokenizers.Tokenizer.from_file(str(_tiny_dir(tmp_path / "tiny") / "tokenizer.json")),
        chat_template="{{ bos_token }}|{{ eos_token }}",
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )
    assert tokenizer.apply_chat_template([]) == "<|endoftext|>|<|im_end|>"
    assert tokenizer.apply_chat_template([], eos_token="X") == "<|endoftext|>|X"
