"""A tiny random Qwen2.5-VL checkpoint in the layout Hugging Face publishes (config.json with
text_config and vision_config, preprocessor_config.json, the Qwen2-VL chat template), built
offline with transformers, and helpers to run transformers on the same images."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import tiny

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# The Qwen2-VL / Qwen2.5-VL chat template, as the checkpoints ship it (chat_template.json).
TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small images: min_pixels 4 merge blocks, max_pixels 64 (28 x 28 px each).
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 64 * 28 * 28


def make_vl_checkpoint(folder: Path, *, arch: str = "qwen2_5_vl", seed: int = 0):
    """Write a tiny random Qwen2.5-VL or Qwen3-VL (`arch`) checkpoint to `folder`; return the transformers model."""
    import transformers
    from tokenizers import AddedToken, Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tiny.make_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in VISION_TOKENS])
    tok.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    vocab_size = tok.get_vocab_size()
    ids = {t: tok.token_to_id(t) for t in VISION_TOKENS + ["<|im_end|>", "<|endoftext|>"]}
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=None, eos_token_id=None)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    if arch == "qwen3_vl":
        text.update(head_dim=32, num_hidden_layers=3,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                                     "mrope_interleaved": True})
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1])
    if arch == "qwen3_vl_moe":  # hidden 64 != 2 * moe_intermediate: the published expert layout is told apart
        text.update(head_dim=32, num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                    decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                                     "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[1])
    config_cls, model_cls = {
        "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration),
        "qwen3_vl": (transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration),
        "qwen3_vl_moe": (transformers.Qwen3VLMoeConfig, transformers.Qwen3VLMoeForConditionalGeneration),
    }[arch]
    cfg = config_cls(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    tiny.randomize(model)
    model.save_pretrained(folder)
    if arch == "qwen3_vl_moe":
        _publish_expert_layout(folder)
        model = model_cls.from_pretrained(folder).eval()  # the reference reads the same file
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR[arch]))
    return model


def _publish_expert_layout(folder: Path) -> None:
    """Rewrite the stacked experts as the Qwen team publishes Qwen3-VL-MoE (each matrix transposed)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    for name in list(tensors):
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensors[name] = tensors[name].transpose(1, 2).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


# As the checkpoints publish them (Qwen3-VL: 16-pixel patches, mean and std 0.5, `size` keys), with small limits.
PREPROCESSOR = {
    "qwen2_5_vl": {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
                   "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711]},
    "qwen3_vl_moe": None,
    "qwen3_vl": {"image_processor_type": "Qwen2VLImageProcessorFast",
                 "size": {"shortest_edge": 4 * 32 * 32, "longest_edge": 64 * 32 * 32},
                 "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
}


PREPROCESSOR["qwen3_vl_moe"] = PREPROCESSOR["qwen3_vl"]


def hf_image_processor(arch: str = "qwen2_5_vl"):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    c = dict(PREPROCESSOR[arch])
    c.pop("image_processor_type")
    return Qwen2VLImageProcessorPil(**c)


def test_image(width: int, height: int, seed: int = 0):
    """A deterministic RGB PIL image with structure (gradients and noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    pixels = (pixels + rng.integers(0, 40, pixels.shape)).clip(0, 255).astype("uint8")
    return Image.fromarray(pixels, "RGB")


test_image.__test__ = False  # not a pytest test


def hf_inputs(model, token_ids: list[int], images):
    """transformers' inputs for prompt `token_ids` (placeholders already expanded) and PIL `images`."""
    processor = hf_image_processor(model.config.model_type)
    out = processor(images=images, return_tensors="pt") if images else None
    input_ids = torch.tensor([token_ids])
    kwargs = dict(input_ids=input_ids,
                  mm_token_type_ids=(input_ids == model.config.image_token_id).int())
    if out is not None:
        kwargs.update(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])
    return kwargs
