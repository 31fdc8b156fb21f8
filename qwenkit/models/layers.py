"""The decoder blocks Qwen2, Qwen3 and Qwen3-MoE share, told apart by `BlockFlags`.

Tokens travel flattened: hidden states are `[num_tokens, hidden_size]` for a whole
step, whatever the number of sequences in it; `AttentionMetadata` says which tokens
belong to which sequence.

Parameters are created uninitialised (`torch.empty`): every one is filled by the
weight loader, which checks that nothing was left out. Fused parameters carry a
`weight_loader(param, tensor, shard)` and the set of `shards` they expect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit import kernels
from qwenkit.config import ModelConfig, RopeConfig
from qwenkit.models.attention import AttentionMetadata, attention


@dataclass(frozen=True)
class BlockFlags:
    """What one architecture's decoder block has; set by each file under models/."""

    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    sparse_moe: bool = False


def _empty(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class RMSNorm(nn.Module):
    """RMS normalisation in float32, cast back before the weight, as transformers does."""

    def __init__(self, size: int, eps: float, *, dtype: torch.dtype):
        super().__init__()
        self.weight = _empty(size, dtype=dtype)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm(x); with `residual`, (RMSNorm(x + residual), x + residual): the previous
        sub-layer's residual add fused in front, one kernel where there is one."""
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)


class Linear(nn.Module):
    """`y = x W^T (+ b)`. With `output_sizes`, several checkpoint matrices stacked on dim 0.

    `shard_names[i]` is how the loader names the i-th block (e.g. "q", "k", "v").
    """

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        *,
        bias: bool,
        dtype: torch.dtype,
        shard_names: tuple = (None,),
    ):
        super().__init__()
        self.output_sizes = output_sizes
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        self.shard_index = {name: i for i, name in enumerate(shard_names)}
        self.weight = _empty(sum(output_sizes), in_features, dtype=dtype)
        self.bias = _empty(sum(output_sizes), dtype=dtype) if bias else None
        for p in (self.weight, self.bias):
            if p is not None:
                p.weight_loader = self._load_shard
                p.shards = frozenset(shard_names)

    def _load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard) -> set:
        i = self.shard_index[shard]
        target = param.data.narrow(0, self.offsets[i], self.output_sizes[i])
        _copy_checked(target, tensor)
        return {shard}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """Token embeddings [vocab_size, hidden_size]; `attend` is the matmul of a tied lm_head."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, dtype: torch.dtype):
        super().__init__()
        self.weight = _empty(num_embeddings, embedding_dim, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight)


def _copy_checked(target: torch.Tensor, tensor: torch.Tensor) -> None:
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(f"expected shape {tuple(target.shape)}, got {tuple(tensor.shape)}")
    target.copy_(tensor)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """float32 inverse frequencies [head_dim // 2] and the cos/sin scale, as transformers computes them."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    pos_freqs = rope.rope_theta**exponents
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    if rope.rope_type == "linear":
        return 1.0 / pos_freqs / rope.factor, 1.0
    # yarn (https://arxiv.org/abs/2309.00071): interpolate the low frequencies, keep the high ones.
    factor = rope.factor

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        original = rope.original_max_position_embeddings
        return (head_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(rope.rope_theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """NEOX-style rotary embedding (the halves of each head rotate together). Computed once
    per step for all layers: `forward` gives the cos and sin tables; the attention prologue
    (`kernels.qk_norm_rope_cache`) rotates."""

    def __init__(self, rope: RopeConfig, head_dim: int, *, dtype: torch.dtype):
        super().__init__()
        inv_freq, self.scale = rope_inverse_frequencies(rope, head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.dtype = dtype

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> cos, sin: [T, 1, D] in the model's dtype."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.scale).to(self.dtype)[:, None, :]
        sin = (emb.sin() * self.scale).to(self.dtype)[:, None, :]
        return cos, sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, flags: BlockFlags, *, dtype: torch.dtype):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(
            config.hidden_size,
            [q_size, kv_size, kv_size],
            bias=flags.qkv_bias,
            dtype=dtype,
            shard_names=("q", "k", "v"),
        )
        self.o_proj = Linear(q_size, [config.hidden_size], bias=flags.o_bias, dtype=dtype)
        if flags.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        q = kernels.qk_norm_rope_cache(
            self.qkv_proj(x), rope[0], rope[1], kv_cache, meta.slot_mapping,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            q_norm=None if self.q_norm is None else self.q_norm.weight,
            k_norm=None if self.k_norm is None else self.k_norm.weight,
            eps=0.0 if self.q_norm is None else self.q_norm.eps,
        )
        return self.o_proj(attention(q, kv_cache, meta, scale=self.scale))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = Linear(
            hidden_size, [intermediate_size, intermediate_size], bias=False, dtype=dtype, shard_names=(0, 1)
        )
        self.down_proj = Linear(intermediate_size, [hidden_size], bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))


class FusedExperts(nn.Module):
    """All experts of one sparse layer as stacked tensors.

    gate_up_proj: [num_experts, 2 * moe_intermediate, hidden] (gate rows first);
    down_proj: [num_experts, hidden, moe_intermediate]. Checkpoints store one matrix per
    expert (`experts.{e}.gate_proj.weight`) or all experts stacked; both load here.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, dtype: torch.dtype):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = _empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype)
        self.down_proj = _empty(num_experts, hidden_size, intermediate_size, dtype=dtype)
        self.gate_up_proj.shards = frozenset((e, j) for e in range(num_experts) for j in (0, 1))
        self.down_proj.shards = frozenset((e, 0) for e in range(num_experts))
        self.gate_up_proj.weight_loader = self.down_proj.weight_loader = self._load_shard

    def _load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard: tuple) -> set:
        """shard = (expert or "*" for all experts, 0 for gate/down rows or 1 for up rows)."""
        expert, part = shard
        rows = param.shape[1] if param is self.down_proj else self.intermediate_size
        target = param.data.narrow(1, part * rows, rows)
        if expert == "*":
            _copy_checked(target, tensor)
            return {(e, part) for e in range(self.num_experts)}
        _copy_checked(target[expert], tensor)
        return {(expert, part)}

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden]; expert_ids, weights: [T, top_k]."""
        return kernels.fused_experts(x, expert_ids, weights, self.gate_up_proj, self.down_proj)


class SparseMoeBlock(nn.Module):
    """Qwen3-MoE's MLP: a float32 softmax router picks top-k experts per token."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = Linear(config.hidden_size, [config.num_experts], bias=False, dtype=dtype)
        self.experts = FusedExperts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size, dtype=dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts(x, expert_ids, weights.to(x.dtype))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, flags: BlockFlags, layer_idx: int, *, dtype: torch.dtype):
        super().__init__()
        self.self_attn = Attention(config, flags, dtype=dtype)
        if flags.sparse_moe and config.is_sparse_layer(layer_idx):
            self.mlp = SparseMoeBlock(config, dtype=dtype)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, dtype=dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it): the next layer,
        or the final norm, adds them (fused into its norm where a kernel does both)."""
        if residual is None:
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm(h, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(x, rope, kv_cache, meta), residual)
        return self.mlp(x), residual


class QwenModel(nn.Module):
    def __init__(self, config: ModelConfig, flags: BlockFlags, *, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, flags, i, dtype=dtype) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.rotary_emb = RotaryEmbedding(config.rope, config.head_dim, dtype=dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.forward_layers(self.embed_tokens(input_ids), positions, kv_caches, meta)

    def forward_layers(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Everything after the embedding: what a compiled decode step traces."""
        rope = self.rotary_emb(positions)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(h, rope, kv_cache, meta, residual)
        return self.norm(h, residual)[0]


class QwenForCausalLM(nn.Module):
    """Base of the three architectures. Subclasses set `block_flags(config)` (and may set
    `inner_model_class`, the decoder stack's class)."""

    inner_model_class = QwenModel

    # Checkpoint matrices stored apart that live in one fused parameter here:
    # HF module name -> (fused module name, shard).
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    @classmethod
    def block_flags(cls, config: ModelConfig) -> BlockFlags:
        raise NotImplementedError

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.model = self.inner_model_class(config, self.block_flags(config), dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, [config.vocab_size], bias=False, dtype=dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden_size] of a flattened step."""
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]. A quantized lm_head on the CPU takes the hidden
        states in float32: its kernels compute in float32, and the logits are not rounded to a
        16-bit model dtype on the way (bfloat16 keeps 8 bits: ~0.1 of a logit of 20)."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        if hidden.device.type == "cpu" and not head.weight.is_floating_point():
            hidden = hidden.float()
        if self.lm_head is None:
            return head.attend(hidden).float()
        return head(hidden).float()

    @property
    def num_kv_heads(self) -> int:
        """KV heads this process holds (all of them, or its tensor-parallel share)."""
        return self.model.layers[0].self_attn.num_kv_heads

    def allocate_kv_cache(
        self, num_slots: int, device: torch.device | None = None, *, dtype: torch.dtype | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (key, value) pair of `[num_slots, num_kv_heads, head_dim]` tensors per layer,
        on `device` (default: the model's; a tensor made without a device lands on the CPU), of
        `dtype` (default: the model's; the attention kernels convert a 16-bit cache)."""
        c = self.config
        device = device or next(self.parameters()).device
        dtype = dtype or self.dtype
        shape = (num_slots, self.num_kv_heads, c.head_dim)
        return [
            (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
            for _ in range(c.num_hidden_layers)
        ]
