"""Tiny random checkpoints of every architecture, in the layout Hugging Face publishes.

Built offline: a byte-level BPE tokenizer trained on a few lines of text, and a
transformers reference model with random weights saved with `save_pretrained`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
]
# Qwen marks only these as special; the think and tool markers are plain added tokens.
_SPECIAL = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}

_CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Qwen3 thinks before it answers. 你好，世界。",
    "1234567890 + - * / = ( ) [ ] { } < > : ; , . ! ?",
]

ARCHS = ("qwen2", "qwen3", "qwen3_moe")


def make_tokenizer(folder: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json (with the official Qwen3 template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS, trainer)
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, special=t in _SPECIAL, normalized=False) for t in SPECIAL_TOKENS])
    tok.save(str(folder / "tokenizer.json"))
    template = (Path(__file__).parent.parent / "qwenkit" / "templates" / "qwen3.jinja").read_text()
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "model_max_length": 512,
                "chat_template": template,
            }
        )
    )


def reference_config(arch: str, vocab_size: int, *, tie: bool = False, yarn: bool = False, max_len: int = 512):
    """A transformers config of `arch`, small enough to run in milliseconds."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_len,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=None,
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, rope_parameters=rope)
    if arch == "qwen3":
        # head_dim deliberately != hidden_size / num_attention_heads, as in real Qwen3.
        return transformers.Qwen3Config(**common, head_dim=32, rope_parameters=rope)
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common,
            head_dim=32,
            rope_parameters=rope,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        )
    raise ValueError(arch)


def randomize(model: torch.nn.Module) -> None:
    """Random weights of the scale the parity tests use: norms near 1, the rest ~0.15."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))


def make_checkpoint(
    folder: Path,
    arch: str,
    *,
    seed: int = 0,
    tie: bool = False,
    yarn: bool = False,
    published_keys: bool = False,
    max_len: int = 512,
):
    """Write a tiny random `arch` checkpoint to `folder`; return the transformers model.

    published_keys rewrites config.json with the key names of published Qwen checkpoints
    (rope_theta / rope_scaling, num_experts, torch_dtype) instead of transformers 5's.
    """
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder)
    vocab_size = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]) + len(SPECIAL_TOKENS)
    config = reference_config(arch, vocab_size, tie=tie, yarn=yarn, max_len=max_len)
    torch.manual_seed(seed)
    cls = {
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
        "qwen3_moe": transformers.Qwen3MoeForCausalLM,
    }[arch]
    model = cls(config).eval()
    randomize(model)
    model.save_pretrained(folder)
    eos = [vocab_size - len(SPECIAL_TOKENS) + SPECIAL_TOKENS.index(t) for t in ("<|im_end|>", "<|endoftext|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    if published_keys:
        cfg = json.loads((folder / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = None if rope["rope_type"] == "default" else rope
        cfg["torch_dtype"] = cfg.pop("dtype")
        if "num_local_experts" in cfg:
            cfg["num_experts"] = cfg.pop("num_local_experts")
        (folder / "config.json").write_text(json.dumps(cfg))
        model = cls.from_pretrained(folder).eval()  # the reference reads the same file
    return model


@contextlib.contextmanager
def scripted(engine, *texts: str):
    """Make the engine's k-th new sequence write texts[k] (the last text for any later
    one), then end its turn, whatever the weights say: the logits are biased towards the
    script, so parsing and control are tested apart from model quality. `engine` is an
    `LLM` or an `AsyncLLM`; yields the scripts' token ids."""
    llm = getattr(engine, "llm", engine)
    end = llm.tokenizer.token_to_id("<|im_end|>")
    scripts = [llm.tokenizer.encode(t) + [end] for t in texts]
    assigned: dict[int, list[int]] = {}
    runner = llm.engine.runner
    original = runner.run

    def run(batch):
        rows, logits = original(batch)
        with torch.inference_mode():
            at = 0
            for r in rows:
                seq = batch[r].seq
                # seq_id, not id(seq): a finished sequence's address may be reused by the next one.
                script = assigned.setdefault(seq.seq_id, scripts[min(len(assigned), len(scripts) - 1)])
                # A sequence with speculative drafts has a row per draft too: row j gives the
                # token after the first j drafts (were they kept).
                for j in range(1 + len(seq.draft_token_ids)):
                    logits[at + j, script[min(seq.num_output_tokens + j, len(script) - 1)]] += 1e4
                at += 1 + len(seq.draft_token_ids)
        return rows, logits

    runner.run = run
    try:
        yield scripts
    finally:
        runner.run = original
