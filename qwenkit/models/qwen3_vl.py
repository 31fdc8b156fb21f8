"""Qwen3-VL (`model_type: qwen3_vl`, and `qwen3_vl_moe` with Qwen3-MoE's experts): Qwen3's decoder (q/k RMSNorm, explicit head_dim)
with interleaved M-RoPE, and a vision tower that differs from Qwen2.5-VL's
(qwenkit/models/qwen2_5_vl.py, whose pieces it shares):

- patches embedded with a bias, plus a learned square table of position embeddings resampled
  bilinearly (corners aligned) to each image's grid;
- LayerNorm blocks with a plain MLP (`linear_fc1`, activation, `linear_fc2`), all attending over
  the whole image (no windows);
- DeepStack: the output of the blocks in `deepstack_visual_indexes`, each merged by a merger of
  its own, is added to the hidden states of the image tokens after the language model's first
  layers (one feature per layer, in order).

The tower's output for an image is [num_tokens, (1 + num_deepstack) * hidden]: the embeddings
that replace the placeholders, then one DeepStack feature per early layer; the encoder cache
keeps them together and the runner passes the features to `forward_layers` as `deepstack`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.config import ModelConfig
from qwenkit.models.attention import AttentionMetadata
from qwenkit.models.layers import BlockFlags, QwenForCausalLM, QwenModel
from qwenkit.models import qwen2_5_vl
from qwenkit.models.quant import materialize
from qwenkit.models.qwen2_5_vl import (
    _ACTIVATIONS, MRotaryEmbedding, PatchEmbed, VisionConfig, VisionLinear, _empty,
    merge_order_positions, vision_rotary,
)


class LayerNorm(nn.Module):
    def __init__(self, size: int, *, dtype: torch.dtype, eps: float = 1e-6):
        super().__init__()
        self.weight = _empty(size, dtype=dtype)
        self.bias = _empty(size, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig, *, dtype: torch.dtype):
        super().__init__()
        self.linear_fc1 = VisionLinear(c.hidden_size, c.intermediate_size, dtype=dtype)
        self.linear_fc2 = VisionLinear(c.intermediate_size, c.hidden_size, dtype=dtype)
        self.act = _ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(qwen2_5_vl.VisionBlock):
    norm_class = LayerNorm
    mlp_class = VisionMLP


class PatchMerger(nn.Module):
    """LayerNorm (per patch, or with `postshuffle` over the merged block), then fc1, GELU, fc2."""

    def __init__(self, c: VisionConfig, *, dtype: torch.dtype, postshuffle: bool = False):
        super().__init__()
        self.width = c.hidden_size * c.merge_unit
        self.postshuffle = postshuffle
        self.norm = LayerNorm(self.width if postshuffle else c.hidden_size, dtype=dtype)
        self.linear_fc1 = VisionLinear(self.width, self.width, dtype=dtype)
        self.linear_fc2 = VisionLinear(self.width, c.out_hidden_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.width)) if self.postshuffle else self.norm(x).view(-1, self.width)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionModel(nn.Module):
    def __init__(self, c: VisionConfig, *, dtype: torch.dtype):
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c, dtype=dtype, bias=True)
        self.pos_embed = nn.Module()
        self.pos_embed.weight = _empty(c.num_position_embeddings, c.hidden_size, dtype=dtype)
        self.side = int(c.num_position_embeddings**0.5)
        self.blocks = nn.ModuleList(VisionBlock(c, dtype=dtype) for _ in range(c.depth))
        self.merger = PatchMerger(c, dtype=dtype)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(c, dtype=dtype, postshuffle=True) for _ in c.deepstack_visual_indexes)
        spatial_dim = c.hidden_size // c.num_heads // 2
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, spatial_dim, 2, dtype=torch.float) / spatial_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _position_embeddings(self, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """[N, hidden]: the learned table resampled bilinearly (align_corners) to each image's grid,
        as transformers' `get_vision_interpolation_indices_and_weights` computes it."""
        side = self.side
        pos = merge_order_positions(grid_thw, self.config.spatial_merge_size)
        sizes = torch.cat([torch.tensor([[h, w]]).expand(t * h * w, 2) for t, h, w in grid_thw])
        taps, weights = [], []
        for axis in (0, 1):
            src = pos[:, axis].float() * (side - 1) / (sizes[:, axis] - 1).clamp(min=1)
            floor = src.floor()
            offsets = torch.arange(2)
            taps.append((floor.long()[:, None] + offsets).clamp(0, side - 1))
            weights.append((1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0))
        index = (taps[0][:, :, None] * side + taps[1][:, None, :]).reshape(-1, 4)
        weight = (weights[0][:, :, None] * weights[1][:, None, :]).reshape(-1, 4)
        table = self.pos_embed.weight
        index, weight = index.to(table.device), weight.to(table.device)
        return (F.embedding(index, table) * weight[:, :, None].to(table.dtype)).sum(1)

    def forward(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """[num_patches / merge_unit, (1 + num_deepstack) * out_hidden_size]."""
        c = self.config
        h = self.patch_embed(pixel_values)
        h = h + self._position_embeddings(grid_thw).to(h.dtype)
        cos, sin = vision_rotary(grid_thw, c.spatial_merge_size, self.inv_freq)
        bounds = [0]
        for t, gh, gw in grid_thw:
            base = bounds[-1]
            bounds.extend(base + gh * gw * (i + 1) for i in range(t))
        features = []
        for i, block in enumerate(self.blocks):
            h = block(h, cos, sin, bounds)
            if i in c.deepstack_visual_indexes:
                features.append(self.deepstack_merger_list[c.deepstack_visual_indexes.index(i)](h))
        return torch.cat([self.merger(h), *features], dim=-1)


class DeepStackModel(QwenModel):
    """Qwen3's decoder; `deepstack` = (rows, features [num_layers, rows, hidden]) adds feature i to
    the image rows' hidden states after layer i."""

    def forward_layers(self, h: torch.Tensor, positions: torch.Tensor,
                       kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                       deepstack: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if deepstack is None:
            return super().forward_layers(h, positions, kv_caches, meta)
        rows, features = deepstack
        rope = self.rotary_emb(positions)
        residual = None
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            h, residual = layer(h, rope, kv_cache, meta, residual)
            if i < len(features):
                # The layer's output is h + residual (added by the next norm): the feature joins h.
                h = h.index_add(0, rows, features[i].to(h.dtype))
        return self.norm(h, residual)[0]


class Qwen3VLForConditionalGeneration(QwenForCausalLM):
    checkpoint_prefixes = {"model.language_model.": "model.", "model.visual.": "visual.", "visual.": "visual."}
    inner_model_class = DeepStackModel

    @classmethod
    def block_flags(cls, config: ModelConfig) -> BlockFlags:
        return BlockFlags(qkv_bias=config.attention_bias, o_bias=config.attention_bias, qk_norm=True)

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype = torch.float32):
        super().__init__(config, dtype=dtype)
        self.model.rotary_emb = MRotaryEmbedding(config, dtype=dtype, interleaved=config.mrope_interleaved)
        self.vision_config = VisionConfig.from_hf(config.vision_config)
        self.visual = VisionModel(self.vision_config, dtype=dtype)
        self.num_deepstack = len(self.vision_config.deepstack_visual_indexes)

    @torch.inference_mode()
    def embed_images(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Per image [num_tokens, (1 + num_deepstack) * hidden_size]: embeddings, then DeepStack features."""
        device = next(self.visual.parameters()).device
        out = self.visual(pixel_values.to(device), grid_thw).to(self.dtype)
        sizes = [t * h * w // self.vision_config.merge_unit for t, h, w in grid_thw]
        return list(out.split(sizes))


class Qwen3VLMoeForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """Qwen3-VL-MoE (`model_type: qwen3_vl_moe`): Qwen3-VL with Qwen3-MoE's sparse MLP. Its experts
    come stacked (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`): as transformers 5 holds them
    ([E, 2 * moe_intermediate, hidden], [E, hidden, moe_intermediate], qwenkit's layout), or as the
    Qwen team publishes them, each matrix transposed."""

    @classmethod
    def block_flags(cls, config: ModelConfig) -> BlockFlags:
        return BlockFlags(qkv_bias=config.attention_bias, o_bias=config.attention_bias, qk_norm=True,
                          sparse_moe=True)

    def convert_checkpoint_tensor(self, name: str, tensor):
        c = self.config
        if name.endswith("mlp.experts.gate_up_proj"):
            published = (c.num_experts, c.hidden_size, 2 * c.moe_intermediate_size)
        elif name.endswith("mlp.experts.down_proj"):
            published = (c.num_experts, c.moe_intermediate_size, c.hidden_size)
        else:
            return tensor
        if tuple(tensor.shape) == published and published[1] != published[2]:
            return materialize(tensor).transpose(1, 2).contiguous()
        return tensor
