"""Parity with transformers' reference classes on the same random weights (float32)."""

from pathlib import Path

import pytest
import torch
from tiny import ARCHS, make_checkpoint

from qwenkit.config import ModelConfig
from qwenkit.errors import ModelLoadError
from qwenkit.loader.safetensors import iter_safetensors
from qwenkit.loader.weights import load_weights
from qwenkit.models import MODEL_REGISTRY
from qwenkit.models.attention import AttentionMetadata

TOL = 1e-4


def load_qwenkit(folder: Path, dtype=torch.float32):
    config = ModelConfig.from_file(folder / "config.json")
    model = MODEL_REGISTRY[config.model_type](config, dtype=dtype)
    load_weights(model, iter_safetensors(folder, dtype))
    return model.eval()


def run(model, ids: list[int], kv, start: int) -> torch.Tensor:
    meta = AttentionMetadata.contiguous(start=start, num_tokens=len(ids))
    hidden = model(torch.tensor(ids), torch.arange(start, start + len(ids)), kv, meta)
    return model.compute_logits(hidden)


VARIANTS = [
    pytest.param(arch, dict(published_keys=pk, tie=tie, yarn=yarn), id=f"{arch}-{label}")
    for arch in ARCHS
    for label, pk, tie, yarn in [
        ("v5-keys", False, False, False),
        ("published-keys", True, False, False),
        ("tied", False, True, False),
        ("yarn", True, False, True),
    ]
]


@pytest.mark.parametrize("arch,options", VARIANTS)
@torch.inference_mode()
def test_logits_match_transformers(tmp_path, arch, options):
    ref = make_checkpoint(tmp_path, arch, **options)
    ours = load_qwenkit(tmp_path)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, ref.config.vocab_size, (24,), generator=g).tolist()
    steps = torch.randint(0, ref.config.vocab_size, (16,), generator=g).tolist()

    # Whole prompt.
    ref_out = ref(torch.tensor([prompt]), use_cache=True)
    kv = ours.allocate_kv_cache(64)
    logits = run(ours, prompt, kv, 0)
    assert (logits - ref_out.logits[0]).abs().max().item() <= TOL

    # 16 decode steps, each reading the cache the previous ones wrote.
    past = ref_out.past_key_values
    for i, token in enumerate(steps):
        ref_out = ref(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past = ref_out.past_key_values
        logits = run(ours, [token], kv, len(prompt) + i)
        assert (logits[0] - ref_out.logits[0, -1]).abs().max().item() <= TOL, f"decode step {i}"


@pytest.mark.parametrize("arch", ARCHS)
@torch.inference_mode()
def test_chunked_prefill_matches_whole(tmp_path, arch):
    make_checkpoint(tmp_path, arch)
    model = load_qwenkit(tmp_path)
    ids = list(range(5, 35))
    whole = run(model, ids, model.allocate_kv_cache(32), 0)
    kv = model.allocate_kv_cache(32)
    chunks = [run(model, ids[i : i + 7], kv, i) for i in range(0, len(ids), 7)]
    assert torch.allclose(torch.cat(chunks), whole, atol=1e-5)


def test_moe_stacked_and_per_expert_checkpoints_load_the_same(tmp_path):
    make_checkpoint(tmp_path, "qwen3_moe")
    per_expert = load_qwenkit(tmp_path)
    stacked_weights = {}
    for name, t in iter_safetensors(tmp_path, torch.float32):
        if ".experts." in name:
            prefix, rest = name.split(".experts.")
            expert, proj = rest.split(".")[:2]
            stacked_weights.setdefault(f"{prefix}.experts.{proj}", {})[int(expert)] = t
        else:
            stacked_weights[name] = t
    flat = [
        (n, torch.stack([v[e] for e in sorted(v)]) if isinstance(v, dict) else v)
        for n, v in stacked_weights.items()
    ]
    stacked = MODEL_REGISTRY["qwen3_moe"](per_expert.config)
    load_weights(stacked, flat)
    for (n, a), (_, b) in zip(per_expert.named_parameters(), stacked.named_parameters()):
        assert torch.equal(a, b), n


def test_moe_layer_choice_follows_config(tmp_path):
    make_checkpoint(tmp_path, "qwen3_moe")
    model = load_qwenkit(tmp_path)
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["SparseMoeBlock", "MLP", "SparseMoeBlock"]  # mlp_only_layers=[1]


def test_missing_and_unused_tensors_are_named(tmp_path):
    make_checkpoint(tmp_path, "qwen3")
    config = ModelConfig.from_file(tmp_path / "config.json")
    weights = list(iter_safetensors(tmp_path, torch.float32))
    dropped = [(n, t) for n, t in weights if n != "model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ModelLoadError, match=r"missing tensors for: model\.layers\.1\.self_attn\.qkv_proj\.weight"):
        load_weights(MODEL_REGISTRY["qwen3"](config), dropped)
    extra = weights + [("model.layers.0.mlp.extra.weight", torch.zeros(2))]
    with pytest.raises(ModelLoadError, match=r"does not use: model\.layers\.0\.mlp\.extra\.weight"):
        load_weights(MODEL_REGISTRY["qwen3"](config), extra)
    wrong = [(n, t[:-1] if n == "model.norm.weight" else t) for n, t in weights]
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight: expected shape \(64,\), got \(63,\)"):
        load_weights(MODEL_REGISTRY["qwen3"](config), wrong)


def test_unsupported_architecture_is_named():
    with pytest.raises(ModelLoadError, match="unsupported model_type 'llama'.*LlamaForCausalLM"):
        ModelConfig.from_hf({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def test_unknown_config_keys_are_reported(caplog):
    config = {
        "model_type": "qwen3", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "brand_new_key": 1,
    }
    assert ModelConfig.from_hf(config).unknown_keys == ("brand_new_key",)
    assert "brand_new_key" in caplog.text
