"""Qwen2.5-VL (`model_type: qwen2_5_vl`): Qwen2's decoder with multimodal rotary positions
(M-RoPE) and a vision tower whose merged patch features take the place of the image
placeholder tokens (`<|image_pad|>`) in the prompt.

The vision tower (transformers' `Qwen2_5_VisionTransformerPretrainedModel`): patches of
`temporal_patch_size x patch_size x patch_size` pixels embedded by one matmul (the checkpoint's
Conv3d, whose stride equals its kernel), blocks of RMSNorm + attention with a 2-D rotary
embedding (row and column of each patch) + SwiGLU, attention within windows of
`window_size` pixels except in `fullatt_block_indexes`, and a merger that concatenates each
`spatial_merge_size^2` neighbouring patches into one token of the language model's width.

M-RoPE: each prompt token has three positions (time, row, column); text tokens have the
same number three times, so a text-only step (and every decode step, at its position plus
the sequence's `rope_delta`) is ordinary RoPE. `mrope_section` says how many of the
head_dim / 2 frequencies each of the three positions drives.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.config import ModelConfig
from qwenkit.errors import ModelLoadError
from qwenkit.models.layers import BlockFlags, QwenForCausalLM, RotaryEmbedding

logger = logging.getLogger(__name__)

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower's shape, from config.json's `vision_config`."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = ()
    in_channels: int = 3
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    # Qwen3-VL: a learned position table (num_position_embeddings, a square grid) resampled to each
    # image, and the blocks whose output feeds the language model's first layers (DeepStack).
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, d: dict) -> "VisionConfig":
        try:
            config = cls(
                depth=int(d["depth"]), hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]), num_heads=int(d["num_heads"]),
                out_hidden_size=int(d["out_hidden_size"]), patch_size=int(d.get("patch_size", 14)),
                temporal_patch_size=int(d.get("temporal_patch_size", 2)),
                spatial_merge_size=int(d.get("spatial_merge_size", 2)),
                window_size=int(d.get("window_size", 112)),
                fullatt_block_indexes=tuple(int(i) for i in d.get("fullatt_block_indexes", ())),
                in_channels=int(d.get("in_channels", 3)), hidden_act=str(d.get("hidden_act", "silu")),
                rope_theta=float((d.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                num_position_embeddings=int(d.get("num_position_embeddings", 0)),
                deepstack_visual_indexes=tuple(int(i) for i in d.get("deepstack_visual_indexes", ())),
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json vision_config is missing the key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"config.json vision_config: {e}") from None
        # Keys read by transformers for training or video, or spelt twice in published configs.
        ignored = {"model_type", "initializer_range", "in_chans", "spatial_patch_size", "tokens_per_second",
                   "torch_dtype", "dtype", "_name_or_path", "transformers_version", "architectures"}
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)} - ignored - {"rope_parameters"})
        if unknown:
            logger.warning("vision_config keys qwenkit does not use: %s", ", ".join(unknown))
        if config.hidden_act not in _ACTIVATIONS:
            raise ModelLoadError(f"config.json vision_config: unsupported hidden_act {config.hidden_act!r}")
        if config.hidden_size % config.num_heads or (config.hidden_size // config.num_heads) % 4:
            raise ModelLoadError("config.json vision_config: hidden_size / num_heads must be a multiple of 4")
        return config

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


def _empty(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class VisionLinear(nn.Module):
    """A float `y = x W^T + b` of the vision tower (never quantized: the tower is small and runs once per image)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, dtype: torch.dtype):
        super().__init__()
        self.weight = _empty(out_features, in_features, dtype=dtype)
        self.bias = _empty(out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class VisionRMSNorm(nn.Module):
    def __init__(self, size: int, *, dtype: torch.dtype, eps: float = 1e-6):
        super().__init__()
        self.weight = _empty(size, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig, *, dtype: torch.dtype):
        super().__init__()
        self.num_heads = c.num_heads
        self.qkv = VisionLinear(c.hidden_size, 3 * c.hidden_size, dtype=dtype)
        self.proj = VisionLinear(c.hidden_size, c.hidden_size, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
        """x: [N, hidden]; cos, sin: [N, 1, head_dim] float32; attention within each segment of cu_seqlens."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(x.dtype)
        out = torch.empty_like(q)
        for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            # [1, H, n, D]: 4-D, as torch's fused CPU attention takes them (3-D inputs fell back to the
            # unfused math path: the tower was measured ~1.3x slower than transformers' with them).
            qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            out[start:end] = F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig, *, dtype: torch.dtype):
        super().__init__()
        self.gate_proj = VisionLinear(c.hidden_size, c.intermediate_size, dtype=dtype)
        self.up_proj = VisionLinear(c.hidden_size, c.intermediate_size, dtype=dtype)
        self.down_proj = VisionLinear(c.intermediate_size, c.hidden_size, dtype=dtype)
        self.act = _ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    """Pre-norm attention, then the MLP, each added to the residual. Qwen3-VL's block is this
    with its own norm and MLP classes."""

    norm_class: type[nn.Module] = VisionRMSNorm
    mlp_class: type[nn.Module] = VisionMLP

    def __init__(self, c: VisionConfig, *, dtype: torch.dtype):
        super().__init__()
        self.norm1 = self.norm_class(c.hidden_size, dtype=dtype)
        self.norm2 = self.norm_class(c.hidden_size, dtype=dtype)
        self.attn = VisionAttention(c, dtype=dtype)
        self.mlp = self.mlp_class(c, dtype=dtype)

    def forward(self, x, cos, sin, cu_seqlens):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, c: VisionConfig, *, dtype: torch.dtype, bias: bool = False):
        super().__init__()
        # The checkpoint's Conv3d weight [hidden, C, T, P, P]; its stride is its kernel, so it is one matmul.
        self.proj = nn.Module()
        self.proj.weight = _empty(c.hidden_size, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size,
                                  dtype=dtype)
        self.proj.bias = _empty(c.hidden_size, dtype=dtype) if bias else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixel_values.to(w.dtype), w.view(w.shape[0], -1), self.proj.bias)


def merge_order_positions(grid_thw: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """int64 [N, 2]: (row, column) of every patch, in the order the processor lays them out
    (merge block by merge block, each frame of a clip alike)."""
    rows = []
    for t, h, w in grid_thw:
        hpos, wpos = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hw = torch.stack([hpos.reshape(shape).transpose(1, 2).flatten(),
                          wpos.reshape(shape).transpose(1, 2).flatten()], dim=-1)
        rows.append(hw.repeat(t, 1))
    return torch.cat(rows)


def vision_rotary(grid_thw: list[tuple[int, int, int]], merge: int, inv_freq: torch.Tensor):
    """cos, sin [N, 1, head_dim] float32 of every patch: its row drives the first half of the
    frequencies, its column the second (the vision towers' 2-D rotary embedding)."""
    pos = merge_order_positions(grid_thw, merge).to(inv_freq.device)
    freqs = (pos[..., None].float() * inv_freq).flatten(1)  # [N, head_dim / 2]: rows' then columns'
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos(), emb.sin()


class PatchMerger(nn.Module):
    def __init__(self, c: VisionConfig, *, dtype: torch.dtype):
        super().__init__()
        width = c.hidden_size * c.merge_unit
        self.ln_q = VisionRMSNorm(c.hidden_size, dtype=dtype)
        self.mlp = nn.Sequential(VisionLinear(width, width, dtype=dtype), nn.GELU(),
                                 VisionLinear(width, c.out_hidden_size, dtype=dtype))
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.width))


class VisionTransformer(nn.Module):
    """Patches of one or more images -> their tokens for the language model."""

    def __init__(self, c: VisionConfig, *, dtype: torch.dtype):
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c, dtype=dtype)
        self.blocks = nn.ModuleList(VisionBlock(c, dtype=dtype) for _ in range(c.depth))
        self.merger = PatchMerger(c, dtype=dtype)
        spatial_dim = c.hidden_size // c.num_heads // 2
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, spatial_dim, 2, dtype=torch.float) / spatial_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _windows(self, grid_thw: list[tuple[int, int, int]]) -> tuple[torch.Tensor, list[int]]:
        """The order that groups merge blocks by attention window, and the windows' patch bounds."""
        c = self.config
        size = c.window_size // c.spatial_merge_size // c.patch_size
        index, bounds, offset = [], [0], 0
        for t, h, w in grid_thw:
            gh, gw = h // c.spatial_merge_size, w // c.spatial_merge_size
            grid = torch.arange(t * gh * gw).reshape(t, gh, gw)
            pad_h, pad_w = size - gh % size, size - gw % size
            nh, nw = (gh + pad_h) // size, (gw + pad_w) // size
            padded = F.pad(grid, (0, pad_w, 0, pad_h), value=-100)
            padded = padded.reshape(t, nh, size, nw, size).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, size * size)
            counts = (padded != -100).sum(-1).flatten()
            flat = padded.flatten()
            index.append(flat[flat != -100] + offset)
            for n in counts.tolist():
                if n:
                    bounds.append(bounds[-1] + n * c.merge_unit)
            offset += t * gh * gw
        return torch.cat(index), bounds

    def forward(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixel_values: [num_patches, C * T * P * P] (the processor's layout); grid_thw: per image
        (t, h, w) in patches. Returns [num_patches / merge_unit, out_hidden_size]."""
        c = self.config
        unit = c.merge_unit
        h = self.patch_embed(pixel_values)
        n = h.shape[0]
        window_index, window_bounds = self._windows(grid_thw)
        window_index = window_index.to(h.device)
        h = h.view(n // unit, unit, -1)[window_index].reshape(n, -1)
        cos, sin = vision_rotary(grid_thw, c.spatial_merge_size, self.inv_freq)
        cos = cos.view(n // unit, unit, 1, -1)[window_index].reshape(n, 1, -1)
        sin = sin.view(n // unit, unit, 1, -1)[window_index].reshape(n, 1, -1)
        full_bounds = [0]
        for t, gh, gw in grid_thw:
            base = full_bounds[-1]
            full_bounds.extend(base + gh * gw * (i + 1) for i in range(t))
        for i, block in enumerate(self.blocks):
            h = block(h, cos, sin, full_bounds if i in c.fullatt_block_indexes else window_bounds)
        merged = self.merger(h)
        return merged[torch.argsort(window_index)]


class MRotaryEmbedding(RotaryEmbedding):
    """RoPE over 1-D positions [T] (text, decode), or M-RoPE over [3, T] (time, row, column).

    Which of the three drives each of the head_dim / 2 frequencies: Qwen2.5-VL gives them in
    three runs (`mrope_section` = [t, h, w] counts); Qwen3-VL interleaves them (t h w t h w ...,
    the last frequencies time's), `mrope_interleaved`."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, interleaved: bool = False):
        super().__init__(config.rope, config.head_dim, dtype=dtype)
        t, h, w = config.mrope_section
        if interleaved:
            j = torch.arange(t + h + w)
            section = torch.zeros_like(j)
            section[(j % 3 == 1) & (j < 3 * h)] = 1
            section[(j % 3 == 2) & (j < 3 * w)] = 2
        else:
            section = torch.cat([torch.full((n,), i) for i, n in enumerate((t, h, w))])
        self.register_buffer("section", section, persistent=False)  # [head_dim / 2]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().forward(positions)
        freqs = positions[..., None].float() * self.inv_freq  # [3, T, D/2]
        freqs = freqs.gather(0, self.section.expand(1, positions.shape[1], -1)).squeeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.scale).to(self.dtype)[:, None, :]
        sin = (emb.sin() * self.scale).to(self.dtype)[:, None, :]
        return cos, sin


class Qwen2_5_VLForConditionalGeneration(QwenForCausalLM):
    # transformers 5 may write the language model under `model.language_model.` and the tower
    # under `model.visual.`; published checkpoints use `model.` and `visual.`.
    checkpoint_prefixes = {"model.language_model.": "model.", "model.visual.": "visual.", "visual.": "visual."}

    @classmethod
    def block_flags(cls, config: ModelConfig) -> BlockFlags:
        return BlockFlags(qkv_bias=True, o_bias=False, qk_norm=False)

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype = torch.float32):
        super().__init__(config, dtype=dtype)
        self.model.rotary_emb = MRotaryEmbedding(config, dtype=dtype)
        self.vision_config = VisionConfig.from_hf(config.vision_config)
        self.visual = VisionTransformer(self.vision_config, dtype=dtype)

    @torch.inference_mode()
    def embed_images(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """The language-model tokens of each image: [t * h * w / merge_unit, hidden_size] apiece."""
        device = next(self.visual.parameters()).device
        out = self.visual(pixel_values.to(device), grid_thw).to(self.dtype)
        sizes = [t * h * w // self.vision_config.merge_unit for t, h, w in grid_thw]
        return list(out.split(sizes))
