"""GGUFCheckpoint: tiny Qwen2 / Qwen3 / Qwen3-MoE round trips through GGUF files written the
way llama.cpp writes them, the embedded default model against transformers' own GGUF
loader and tokenizer, and the errors a user can hit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from qwenkit.config import ModelConfig
from qwenkit.errors import ModelLoadError
from qwenkit.loader.gguf import GGUFCheckpoint

transformers = pytest.importorskip("transformers")

HALF_TYPES = {"F16": torch.float16, "BF16": torch.bfloat16}
ARCH_ENUMS = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3, "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE}
# A tiny vocabulary: three Qwen special tokens, then plain ones, the last one a merge.
TINY_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"t{i}" for i in range(252)] + ["t1t2"]
TINY_MERGES = ["t1 t2"]
COMMON = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=256, intermediate_size=128, max_position_embeddings=4096, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)


def tiny_model(arch: str, *, tie_word_embeddings: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(COMMON, tie_word_embeddings=tie_word_embeddings)
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()
    if arch == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=32)).eval()
    config = transformers.Qwen3MoeConfig(
        **common, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True
    )
    return transformers.Qwen3MoeForCausalLM(config).eval()


def gguf_tensors(model: torch.nn.Module, arch: str) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names (gguf's own map), q/k left unpermuted as
    llama.cpp leaves them for Qwen; fused experts split into gate and up."""
    name_map = gguf.get_tensor_name_map(ARCH_ENUMS[arch], model.config.num_hidden_layers)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for a tied model
        array = tensor.float().numpy()
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]: gate rows first
            prefix = name_map.get_name(name.replace("gate_up_proj", "gate_proj"))
            gate, up = np.split(array, 2, axis=1)
            tensors[f"{prefix}.weight"] = gate
            tensors[f"{prefix.replace('gate', 'up')}.weight"] = up
            continue
        base, suffix = (name, "weight") if name.endswith("experts.down_proj") else name.rsplit(".", 1)
        tensors[f"{name_map.get_name(base)}.{suffix}"] = array
    return tensors


def write_gguf(
    path: Path, model: torch.nn.Module, arch: str, *, weight_type: str | Callable[[str], str] = "F32", extra=None
) -> Path:
    """Matrices (rows a multiple of the type's block) in `weight_type` (or `weight_type(gguf_name)`),
    the rest in F32."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if arch != "qwen2":
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if arch == "qwen3moe":
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(TINY_TOKENS)
    writer.add_token_types([3, 3, 3] + [1] * (len(TINY_TOKENS) - 3))
    writer.add_token_merges(TINY_MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    if extra is not None:
        extra(writer)
    for name, array in gguf_tensors(model, arch).items():
        tensor_type = gguf.GGMLQuantizationType[weight_type if isinstance(weight_type, str) else weight_type(name)]
        block_size = gguf.GGML_QUANT_SIZES[tensor_type][0]
        if array.ndim >= 2 and array.shape[-1] % block_size == 0 and tensor_type != gguf.GGMLQuantizationType.F32:
            if tensor_type in RANDOM_BLOCK_TYPES:
                raw = random_blocks(array.shape, tensor_type, seed=len(name))
            else:
                raw = gguf.quants.quantize(array, tensor_type)
            writer.add_tensor(name, raw, raw_dtype=tensor_type)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# gguf-py cannot quantize to these; `random_blocks` stands in for the model's values.
# Block layouts (llama.cpp's ggml-common.h): Q4_K is fp16 d, fp16 dmin, 12 bytes of 6-bit
# scales and mins, 128 bytes of nibbles; Q6_K is 128 + 64 bytes of low and high bits,
# 16 int8 scales, fp16 d.
RANDOM_BLOCK_TYPES = {gguf.GGMLQuantizationType.Q4_K: (0, 2), gguf.GGMLQuantizationType.Q5_K: (0, 2),
                      gguf.GGMLQuantizationType.Q6_K: (208,)}


def random_blocks(shape: tuple[int, ...], tensor_type, *, seed: int) -> np.ndarray:
    """Valid random `tensor_type` data for a tensor of `shape` (every bit pattern of the
    values and sub-block scales), its fp16 super-block scales set so values stay below ~0.2."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (int(np.prod(shape)) // block_size, type_size), dtype=np.uint8)
    for offset in RANDOM_BLOCK_TYPES[tensor_type]:
        blocks[:, offset : offset + 2] = np.full((len(blocks), 1), 2e-4, np.float16).view(np.uint8)
    return blocks.reshape(*shape[:-1], -1)


def expected_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF tensors under the names GGUFCheckpoint yields: fused experts as gate_proj / up_proj."""
    expected = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if name.endswith("gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)
            expected[name.replace("gate_up_proj", "gate_proj")] = gate
            expected[name.replace("gate_up_proj", "up_proj")] = up
        else:
            expected[name] = tensor
    return expected


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen3moe"])
@pytest.mark.parametrize("weight_type", ["F32", "F16", "BF16", "Q8_0"])
def test_tiny_round_trip(tmp_path, arch, weight_type):
    model = tiny_model(arch)
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "tiny.gguf", model, arch, weight_type=weight_type))
    loaded = dict(ckpt.iter_weights())
    expected = expected_state_dict(model)
    assert sorted(loaded) == sorted(expected)
    for name, want in expected.items():
        got = loaded[name]
        assert got.shape == want.shape and got.dtype == torch.float32, name
        if weight_type == "F32" or want.ndim < 2:
            assert torch.equal(got, want), name
        elif weight_type in ("F16", "BF16"):
            assert torch.equal(got, want.to(HALF_TYPES[weight_type]).float()), name
        else:
            # Q8_0: 32 values share one scale amax/127; rounding costs half a step, plus the scale's fp16 rounding.
            blocks = want.reshape(-1, 32)
            step = blocks.abs().amax(dim=1, keepdim=True) / 127
            error = (got.reshape(-1, 32) - blocks).abs()
            assert torch.all(error <= 0.6 * step + 1e-7), name
            assert not torch.equal(got, want), name
    bf16 = dict(ckpt.iter_weights(torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen3moe"])
def test_tiny_hf_config(tmp_path, arch):
    model = tiny_model(arch)
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "tiny.gguf", model, arch))
    got, want = ckpt.hf_config(), model.config
    head_dim = getattr(want, "head_dim", None) or want.hidden_size // want.num_attention_heads  # Qwen2 has none
    assert got["model_type"] == want.model_type and got["head_dim"] == head_dim
    for key in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "intermediate_size", "rms_norm_eps", "vocab_size", "tie_word_embeddings", "max_position_embeddings",
    ):
        assert got[key] == getattr(want, key), key
    assert got["rope_theta"] == want.rope_parameters["rope_theta"]
    if arch == "qwen3moe":
        assert (got["num_experts"], got["num_experts_per_tok"], got["moe_intermediate_size"]) == (4, 2, 32)
        assert got["norm_topk_prob"] is True
    config = ModelConfig.from_hf(got)
    assert config.unknown_keys == ()
    assert config.head_dim == head_dim and config.rope.rope_theta == 1e6
    assert config.attention_bias == (arch == "qwen2")
    assert config.num_experts == (4 if arch == "qwen3moe" else 0)


def test_tiny_metadata(tmp_path):
    def yarn(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(4.0)
        writer.add_rope_scaling_orig_ctx_len(1024)
        writer.add_chat_template("{{ messages }}")

    model = tiny_model("qwen3", tie_word_embeddings=True)
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "tiny.gguf", model, "qwen3", extra=yarn))

    config = ckpt.hf_config()
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in dict(ckpt.iter_weights())
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    rope = ModelConfig.from_hf(config).rope
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == ("yarn", 4.0, 1024)
    # eos from the metadata first, then <|endoftext|>, found by its text.
    assert ckpt.generation_config() == {"eos_token_id": [2, 0], "bos_token_id": 0, "pad_token_id": 0}
    assert ckpt.special_tokens() == {
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"
    }
    assert ckpt.chat_template == "{{ messages }}"


# -- the embedded default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M) ------------------------


@pytest.fixture(scope="module")
def default_ckpt(default_gguf) -> GGUFCheckpoint:
    return GGUFCheckpoint(default_gguf)


@pytest.fixture(scope="module")
def default_weights(default_ckpt) -> dict[str, torch.Tensor]:
    return dict(default_ckpt.iter_weights())


@pytest.mark.slow
def test_default_hf_config(default_ckpt):
    config = default_ckpt.hf_config()
    assert config["model_type"] == "qwen2"
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (896, 24, 4864)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (14, 2, 64)
    assert (config["vocab_size"], config["rope_theta"], config["rms_norm_eps"]) == (151936, 1e6, 1e-6)
    assert config["tie_word_embeddings"] is False  # this file carries output.weight
    assert ModelConfig.from_hf(config).unknown_keys == ()
    generation = default_ckpt.generation_config()
    assert generation["eos_token_id"] == [151645, 151643]
    assert default_ckpt.special_tokens()["eos_token"] == "<|im_end|>"
    assert default_ckpt.chat_template.startswith("{%- if tools %}")


@pytest.mark.slow
def test_default_weights_have_hf_names_and_shapes(default_ckpt, default_weights):
    config = transformers.Qwen2Config(**default_ckpt.hf_config())
    with torch.device("meta"):
        reference = transformers.Qwen2ForCausalLM(config).state_dict()
    assert sorted(default_weights) == sorted(reference)
    for name, tensor in default_weights.items():
        assert tensor.shape == reference[name].shape, name
        assert torch.isfinite(tensor).all(), name


@pytest.mark.slow
def test_default_weights_match_transformers_loader(default_ckpt, default_weights):
    """Name map and values against transformers' GGUF loader for qwen2 (gguf.GGUFReader +
    gguf.dequantize + TensorProcessor), and against transformers' torch dequantizer."""
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    config = transformers.Qwen2Config(**default_ckpt.hf_config())
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(config)
    processor = TENSOR_PROCESSORS.get("qwen2", TensorProcessor)(config=config.to_dict())
    name_map = get_gguf_hf_weights_map(model, processor)
    reader = gguf.GGUFReader(str(default_ckpt.path))
    assert sorted(name_map[t.name] for t in reader.tensors) == sorted(default_weights)

    # One tensor of each type in the file.
    checked = {"Q4_K": "blk.11.ffn_down.weight", "Q5_0": "blk.0.attn_k.weight", "Q6_K": "blk.0.ffn_down.weight",
               "Q8_0": "blk.0.attn_v.weight", "F32": "blk.0.attn_q.bias"}
    tensors = {t.name: t for t in reader.tensors}
    for type_name, gguf_name in checked.items():
        tensor = tensors[gguf_name]
        assert tensor.tensor_type.name == type_name
        result = processor.process(
            weights=gguf.dequantize(tensor.data, tensor.tensor_type), name=gguf_name,
            tensor_key_mapping=name_map, parsed_parameters={},
        )
        ours = default_weights[name_map[result.name]]
        assert torch.equal(torch.from_numpy(np.copy(result.weights)), ours), gguf_name
        if type_name in ("Q4_K", "Q6_K", "Q8_0"):
            raw = torch.from_numpy(np.array(tensor.data)).reshape(-1)
            assert torch.equal(torch_dequantize(raw, tensor.tensor_type.value).reshape(ours.shape), ours), gguf_name


@pytest.mark.slow
def test_default_qk_not_permuted(default_ckpt, default_weights):
    """llama.cpp leaves Qwen's q/k rows in HF order. Copying a random token sequence (an
    induction task that needs exact relative positions) works with the weights as loaded and
    fails once LLaMA's rope permutation is applied to them."""
    config = transformers.Qwen2Config(**default_ckpt.hf_config())
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(config)
    model.load_state_dict(default_weights, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # a buffer, not in the checkpoint
    model.eval()
    torch.manual_seed(0)
    sequence = torch.randint(1000, 20000, (40,))
    ids = torch.cat([sequence, sequence])[None]
    labels = ids.clone()
    labels[:, :40] = -100  # only the repeat is predictable

    def loss() -> float:
        with torch.no_grad():
            return model(ids, labels=labels).loss.item()

    as_loaded = loss()  # 0.72
    for layer in model.model.layers:
        attn = layer.self_attn
        for proj, heads in ((attn.q_proj, config.num_attention_heads), (attn.k_proj, config.num_key_value_heads)):
            proj.weight = torch.nn.Parameter(_llama_permute(proj.weight, heads))
            proj.bias = torch.nn.Parameter(_llama_permute(proj.bias, heads))
    assert as_loaded < 2.0
    assert loss() > as_loaded + 5.0  # 10.4


def _llama_permute(weights: torch.Tensor, num_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: halves of each head -> interleaved pairs."""
    return (
        weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


TOKENIZER_TEXTS = [
    "你好，世界！今天天气很好。",
    "Hello world, it's a test. I'll say we're done",
    "def f(x):\n    if x:\n        return [1, 2]\n\treturn None\n",
    "emoji 😀🎉👍🏽 done",
    "a  \n\n\n  b\t\t",
    "12345 3.14159 1,000,000",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
    "   leading and trailing   ",
    "Ünïcödé café naïve",
]


@pytest.mark.slow
def test_default_tokenizer_matches_transformers(default_ckpt, hf_gguf_tokenizer):
    reference = hf_gguf_tokenizer
    ours = default_ckpt.tokenizer_backend()
    for text in TOKENIZER_TEXTS:
        ids = ours.encode(text).ids
        assert ids == reference.encode(text, add_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.get_vocab_size() == 151936
    assert ours.token_to_id("<|im_end|>") == 151645
    # Qwen's tokenizer.json normalizes to NFC; transformers' GGUF tokenizer has no normalizer.
    assert ours.encode("cafe\u0301").ids == ours.encode("caf\u00e9").ids


# -- errors ----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found") as e:
        GGUFCheckpoint(tmp_path / "nope.gguf")
    assert "nope.gguf" in str(e.value)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"{\"hello\": \"world\"}" * 4)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        GGUFCheckpoint(path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        GGUFCheckpoint(tmp_path / "empty.gguf")


def test_truncated(tmp_path):
    data = write_gguf(tmp_path / "tiny.gguf", tiny_model("qwen2"), "qwen2").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])  # in the middle of the tensor data
    with pytest.raises(ModelLoadError, match="truncated GGUF file: tensor .* ends at byte") as e:
        GGUFCheckpoint(tmp_path / "cut.gguf")
    assert "cut.gguf" in str(e.value)
    (tmp_path / "head.gguf").write_bytes(data[:200])  # in the middle of the metadata
    with pytest.raises(ModelLoadError, match="truncated or corrupt GGUF header"):
        GGUFCheckpoint(tmp_path / "head.gguf")


def test_unsupported_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="unsupported architecture 'llama'"):
        GGUFCheckpoint(tmp_path / "llama.gguf")


def test_unknown_tensor_and_type(tmp_path):
    model = tiny_model("qwen2")

    def add(name, array, raw_dtype=None):
        def extra(writer):
            writer.add_tensor(name, array, raw_dtype=raw_dtype)
        return extra

    path = write_gguf(tmp_path / "a.gguf", model, "qwen2", extra=add("blk.0.mystery.weight", np.zeros(4, np.float32)))
    with pytest.raises(ModelLoadError, match="'blk.0.mystery.weight'"):
        GGUFCheckpoint(path)
    q4_1 = gguf.GGMLQuantizationType.Q4_1
    packed = gguf.quants.quantize(np.zeros((4, 32), np.float32), q4_1)
    path = write_gguf(tmp_path / "b.gguf", model, "qwen2", extra=add("blk.0.attn_q_norm.weight", packed, q4_1))
    with pytest.raises(ModelLoadError, match="blk.0.attn_q_norm.weight is stored as Q4_1"):
        GGUFCheckpoint(path)


def test_unsupported_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model("qwen2"), "qwen2")
    # tokenizer.ggml.model is the only "gpt2" in the file.
    path.write_bytes(path.read_bytes().replace(b"gpt2", b"bert", 1))
    ckpt = GGUFCheckpoint(path)  # weights and config need no tokenizer
    with pytest.raises(ModelLoadError, match="unsupported tokenizer .*'bert'"):
        ckpt.tokenizer_backend()
