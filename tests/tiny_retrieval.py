"""Tiny random Qwen3-Embedding and Qwen3-Reranker checkpoints, in their published layouts.

The embedding model is a `Qwen3Model`'s weights (names without "model.", no lm_head) with
sentence-transformers' last-token pooling config beside them, as Qwen3-Embedding ships;
the reranker is a `Qwen3ForCausalLM` whose vocabulary has the single tokens "yes" and "no".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny import make_tokenizer, randomize, reference_config


def make_retrieval_checkpoint(folder: Path, kind: str, *, seed: int = 0, max_len: int = 1024):
    """Write a tiny `kind` ("embedding" or "reranker") checkpoint; return the transformers model."""
    import transformers
    from tokenizers import Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    if kind == "reranker":
        tok.add_tokens(["yes", "no"])
        tok.save(str(folder / "tokenizer.json"))
    config = reference_config("qwen3", tok.get_vocab_size(with_added_tokens=True), max_len=max_len)
    torch.manual_seed(seed)
    cls = transformers.Qwen3Model if kind == "embedding" else transformers.Qwen3ForCausalLM
    model = cls(config).eval()
    randomize(model)
    model.save_pretrained(folder)
    if kind == "embedding":
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": config.hidden_size, "pooling_mode_lasttoken": True,
             "pooling_mode_mean_tokens": False, "include_prompt": True}))
    return model
