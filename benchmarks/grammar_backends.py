"""Which constrained-decoding library is fastest on the real Qwen vocabulary (151,936 ids)?

    python benchmarks/grammar_backends.py [--gguf default] [--repeats 3]

For each of llguidance, xgrammar and outlines-core (whichever are installed) it reports:
the one-off tokenizer setup per model; compile time of a JSON schema (nested objects,
arrays, enums, integers) and of "any JSON object" (first compile, nothing cached); and the
time to fill the next-token bitmask (int32 [ceil(V/32)]) at each step of a valid answer
tokenized by the real tokenizer, plus the time to accept that token. The last block times
qwenkit.chat.structured end to end: GrammarMatcher.allowed_mask() returns bool [V].
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "scores": {"type": "array", "items": {"type": "number"}},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
SCHEMA_ANSWER = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "admin",
    "address": {"city": "London", "zip": "12345"},
    "tags": ["math", "engines", "poetry"],
    "scores": [9.5, 8, 10],
}
OBJECT_ANSWER = {
    "id": 1234,
    "title": "Quarterly report",
    "done": False,
    "owner": None,
    "items": [{"sku": "A-1", "qty": 3, "price": 9.99}, {"sku": "B-22", "qty": 1, "price": 120.5}],
    "meta": {"created": "2024-05-01T10:00:00Z", "labels": ["finance", "q2"], "nested": {"deep": [1, [2, [3]]]}},
}


def load_tokenizer(gguf: str):
    from qwenkit.loader.gguf import GGUFCheckpoint
    from qwenkit.tokenizer import Tokenizer

    from qwenkit.model_files import resolve_model

    ck = GGUFCheckpoint(resolve_model(gguf, progress=False).path)
    tok = Tokenizer(ck.tokenizer_backend(), chat_template=ck.chat_template, **ck.special_tokens())
    return tok, int(ck.hf_config()["vocab_size"])


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.2f} ms"


class Llguidance:
    name = "llguidance"

    def __init__(self, tok, vocab_size):
        import llguidance

        self.llg = llguidance
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=vocab_size, eos_token=tok.eos_token_id)

    def compile(self, schema):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": True})
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def matcher(self, grammar):
        return self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)

    def fill(self, matcher, bitmask):
        matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    def accept(self, matcher, token_id):
        ok = matcher.consume_token(token_id)
        assert ok, matcher.get_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab_size):
        import xgrammar

        self.xgr = xgrammar
        vocab = tok.backend.get_vocab(with_added_tokens=True)
        encoded = [""] * len(vocab)
        for token, index in vocab.items():
            encoded[index] = token
        info = xgrammar.TokenizerInfo(
            encoded, xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab_size, stop_token_ids=[tok.eos_token_id]
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    def compile(self, schema):
        if schema == {"type": "object"}:
            return self.compiler.compile_builtin_json_grammar()
        return self.compiler.compile_json_schema(schema)

    def matcher(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def fill(self, matcher, bitmask):
        matcher.fill_next_token_bitmask(bitmask.view(1, -1))

    def accept(self, matcher, token_id):
        assert matcher.accept_token(token_id)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, vocab_size):
        import outlines_core
        from outlines_core import json_schema

        self.oc = outlines_core
        self.build_regex = json_schema.build_regex_from_schema
        byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        tokens: dict[bytes, list[int]] = {}
        special = {t.content for t in tok.backend.get_added_tokens_decoder().values()}
        for token, index in tok.backend.get_vocab(with_added_tokens=True).items():
            if index == tok.eos_token_id:
                continue
            raw = token.encode() if token in special else bytes(byte_decoder[c] for c in token)
            tokens.setdefault(raw, []).append(index)
        self.vocabulary = outlines_core.Vocabulary(tok.eos_token_id, tokens)

    def compile(self, schema):
        # Regular languages only: "any JSON object" is recursive, so this is a bounded-depth
        # approximation (outlines' own json_object mode uses a CFG outside outlines-core).
        regex = self.build_regex(json.dumps(schema), r"[ \n]?")
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, grammar):
        return self.oc.Guide(grammar)

    def fill(self, matcher, bitmask):
        matcher.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4)

    def accept(self, matcher, token_id):
        matcher.advance(token_id)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte-level alphabet: printable bytes map to themselves, the rest to U+0100...
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def bench_backend(cls, tok, vocab_size, repeats):
    import torch

    t0 = time.perf_counter()
    backend = cls(tok, vocab_size)
    setup_s = time.perf_counter() - t0
    print(f"\n== {cls.name}: tokenizer setup {_ms(setup_s)}")
    cases = [("json_schema", SCHEMA, SCHEMA_ANSWER), ("json_object", {"type": "object"}, OBJECT_ANSWER)]
    for label, schema, answer in cases:
        compile_times = []
        try:
            for _ in range(repeats):
                gc.collect()
                t0 = time.perf_counter()
                grammar = backend.compile(schema)
                compile_times.append(time.perf_counter() - t0)
        except Exception as e:  # report and go on: a backend may not support a case
            print(f"  {label:12s} compile FAILED: {type(e).__name__}: {str(e)[:200]}")
            continue
        ids = tok.encode(json.dumps(answer))
        bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        fill_times, accept_times, first_fill = [], [], None
        rejected = None
        for rep in range(repeats):
            matcher = backend.matcher(grammar)
            for step, token_id in enumerate(ids):
                t0 = time.perf_counter()
                backend.fill(matcher, bitmask)
                t1 = time.perf_counter()
                if not (int(bitmask[token_id // 32]) >> (token_id % 32)) & 1:
                    rejected = f"answer token {step} {tok.decode([token_id])!r} masked out"
                    break
                backend.accept(matcher, token_id)
                t2 = time.perf_counter()
                if rep == 0 and first_fill is None:
                    first_fill = t1 - t0
                fill_times.append(t1 - t0)
                accept_times.append(t2 - t1)
        if rejected is not None:
            print(f"  {label:12s} compile {_ms(min(compile_times))} | WRONG: {rejected}")
            continue
        fill_times.sort()
        print(
            f"  {label:12s} compile {_ms(min(compile_times))} (first {_ms(compile_times[0])}) | "
            f"{len(ids)} tokens: mask median {_ms(statistics.median(fill_times))} "
            f"p90 {_ms(fill_times[int(0.9 * len(fill_times))])} max {_ms(fill_times[-1])} "
            f"first {_ms(first_fill)} | accept median {_ms(statistics.median(accept_times))}"
        )


def bench_qwenkit(tok, vocab_size, repeats):
    """End to end through qwenkit.chat.structured: allowed_mask() is fill + padding AND + unpack."""
    from qwenkit.chat.structured import GrammarCompiler

    t0 = time.perf_counter()
    compiler = GrammarCompiler(tok, vocab_size)
    print(f"\n== qwenkit.chat.structured (llguidance): GrammarCompiler() {_ms(time.perf_counter() - t0)}")
    for label, build, answer in [
        ("json_schema", lambda: compiler.json_schema(SCHEMA), SCHEMA_ANSWER),
        ("json_object", compiler.json_object, OBJECT_ANSWER),
    ]:
        t0 = time.perf_counter()
        grammar = build()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        build()
        cached_s = time.perf_counter() - t0
        ids = tok.encode(json.dumps(answer))
        times = []
        for _ in range(repeats):
            matcher = grammar.matcher()
            for token_id in ids:
                t0 = time.perf_counter()
                mask = matcher.allowed_mask()
                times.append(time.perf_counter() - t0)
                assert mask[token_id] and matcher.accept(token_id)
        times.sort()
        print(
            f"  {label:12s} compile {_ms(compile_s)} cached {_ms(cached_s)} | allowed_mask() bool[{vocab_size}] "
            f"median {_ms(statistics.median(times))} p90 {_ms(times[int(0.9 * len(times))])} max {_ms(times[-1])}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default="default", help="a .gguf file, or 'default' (the embedded model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="llguidance,xgrammar,outlines-core")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)
    tok, vocab_size = load_tokenizer(args.gguf)
    print(f"Qwen tokenizer: {tok.vocab_size} tokens, model vocab_size {vocab_size}")
    backends = {cls.name: cls for cls in (Llguidance, Xgrammar, OutlinesCore)}
    for name in args.backends.split(","):
        try:
            bench_backend(backends[name], tok, vocab_size, args.repeats)
        except ImportError as e:
            print(f"\n== {name}: not installed ({e})")
    bench_qwenkit(tok, vocab_size, args.repeats)


if __name__ == "__main__":
    main()
