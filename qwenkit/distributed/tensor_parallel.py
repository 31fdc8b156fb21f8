"""Split a model across the ranks of a tensor-parallel group (Megatron-LM's layout, as vLLM
and gpt-fast apply it), before its weights are loaded:

- attention: each rank holds `num_heads / N` query heads and their KV heads (KV heads are
  split when there are at least N, else each is replicated on the ranks whose query heads
  use it); q/k/v are column-parallel, `o_proj` row-parallel with an all-reduce. Each
  rank's KV cache holds only its KV heads.
- dense MLP: gate/up column-parallel, down row-parallel with an all-reduce.
- MoE: the router replicated; each expert's matrices split like the dense MLP's (tensor
  parallel) or the experts themselves dealt out, `num_experts / N` whole experts a rank
  (expert parallel): the hidden states are the same on every rank, each computes the
  contributions of its own experts, and one all-reduce sums them.
- embedding and lm_head: vocabulary-parallel (rows padded to N equal shares); the
  embedding all-reduces, the lm_head all-gathers its logits.

Each sharded parameter keeps the full checkpoint tensor's loader interface: its loader
narrows the incoming tensor to this rank's slice before copying, so a rank reads only its
slices of a memory-mapped safetensors file. The model is built on the `meta` device,
sharded, then materialised on the rank's device, so no rank ever holds the whole model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit import kernels
from qwenkit.distributed.parallel import TensorParallel
from qwenkit.models.layers import (
    Attention,
    Embedding,
    FusedExperts,
    Linear,
    MLP,
    QwenForCausalLM,
    SparseMoeBlock,
    _copy_checked,
    _empty,
    rope_inverse_frequencies,
)


class ColumnParallelLinear(Linear):
    """This rank's rows of each stacked matrix: shard i is rows `ranges[i]` = (start,
    length) of the checkpoint's matrix i."""

    def __init__(self, in_features: int, ranges: list[tuple[int, int]], *, bias: bool, dtype: torch.dtype,
                 shard_names: tuple = (None,)):
        super().__init__(in_features, [n for _, n in ranges], bias=bias, dtype=dtype, shard_names=shard_names)
        self.ranges = ranges
        _mark_sharded(self)

    def _load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard) -> set:
        start, length = self.ranges[self.shard_index[shard]]
        return super()._load_shard(param, tensor.narrow(0, start, length), shard)


class RowParallelLinear(Linear):
    """Columns `in_range` of the checkpoint's matrix; the partial products are summed over
    the ranks. The bias is added once: rank 0 loads it, the others hold zeros."""

    def __init__(self, in_range: tuple[int, int], out_features: int, *, bias: bool, dtype: torch.dtype,
                 tp: TensorParallel):
        super().__init__(in_range[1], [out_features], bias=bias, dtype=dtype)
        self.in_range = in_range
        self.tp = tp
        _mark_sharded(self)

    def _load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard) -> set:
        if param is self.weight:
            tensor = tensor.narrow(1, *self.in_range)
        elif self.tp.rank != 0:
            tensor = torch.zeros_like(tensor)
        return super()._load_shard(param, tensor, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x))


class VocabParallelEmbedding(Embedding):
    """Rows [start, start + per_rank) of the vocabulary (past its end: zero rows)."""

    def __init__(self, vocab_size: int, embedding_dim: int, *, dtype: torch.dtype, tp: TensorParallel):
        self.per_rank = -(-vocab_size // tp.size)
        super().__init__(self.per_rank, embedding_dim, dtype=dtype)
        self.vocab_size, self.start, self.tp = vocab_size, tp.rank * self.per_rank, tp
        self.weight.weight_loader = self._load
        _mark_sharded(self)

    def _load(self, param: nn.Parameter, tensor: torch.Tensor, shard) -> set:
        rows = max(0, min(self.per_rank, self.vocab_size - self.start))
        param.data.zero_()
        _copy_checked(param.data[:rows], tensor.narrow(0, self.start, rows))
        return {None}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.per_rank)
        h = F.embedding(local.clamp(0, self.per_rank - 1), self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(h)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The tied lm_head: this rank's vocabulary slice of the logits, gathered."""
        return self.tp.all_gather(F.linear(x, self.weight))[..., : self.vocab_size]


class VocabParallelLMHead(ColumnParallelLinear):
    def __init__(self, hidden_size: int, vocab_size: int, *, dtype: torch.dtype, tp: TensorParallel):
        self.per_rank = -(-vocab_size // tp.size)
        start = tp.rank * self.per_rank
        self.rows = max(0, min(self.per_rank, vocab_size - start))
        super().__init__(hidden_size, [(start, self.rows)], bias=False, dtype=dtype)
        self.weight = _empty(self.per_rank, hidden_size, dtype=dtype)  # padded to an equal share
        self.weight.weight_loader, self.weight.shards = self._load_shard, frozenset({None})
        self.vocab_size, self.tp = vocab_size, tp
        _mark_sharded(self)

    def _load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard) -> set:
        start, rows = self.ranges[0]
        param.data.zero_()
        _copy_checked(param.data[:rows], tensor.narrow(0, start, rows))
        return {None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather(F.linear(x, self.weight))[..., : self.vocab_size]


class TensorParallelExperts(FusedExperts):
    """Every expert, each with rows `i_range` of its intermediate dimension; the partial
    outputs are summed over the ranks."""

    def __init__(self, num_experts: int, hidden_size: int, i_range: tuple[int, int], *, dtype: torch.dtype,
                 tp: TensorParallel):
        super().__init__(num_experts, hidden_size, i_range[1], dtype=dtype)
        self.i_range, self.tp = i_range, tp
        _mark_sharded(self)

    def _load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard) -> set:
        start, length = self.i_range
        if shard is None:  # all experts, gate and up stacked: [E, 2 I, H] / down [E, H, I]
            if param is self.down_proj:
                return super()._load_shard(param, tensor.narrow(2, start, length), ("*", 0))
            half = tensor.shape[1] // 2
            done = set()
            for part in (0, 1):
                done |= super()._load_shard(param, tensor.narrow(1, part * half + start, length), ("*", part))
            return done
        expert, part = shard
        dim = (1 if param is self.down_proj else 0) + (expert == "*")
        return super()._load_shard(param, tensor.narrow(dim, start, length), shard)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x, expert_ids, weights))


class ExpertParallelExperts(FusedExperts):
    """Whole experts `first .. first + num_local - 1`; each rank adds its experts'
    contributions, one all-reduce sums them."""

    syncs_with_host = True  # the local pairs are counted on the host: no CUDA graphs

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, dtype: torch.dtype,
                 tp: TensorParallel):
        self.first, num_local = tp.split(num_experts, "num_experts")
        super().__init__(num_local, hidden_size, intermediate_size, dtype=dtype)
        self.tp = tp
        _mark_sharded(self)

    def _load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard) -> set:
        local = slice(self.first, self.first + self.num_experts)
        if shard is None:  # all experts stacked, gate and up together
            _copy_checked(param.data, tensor[local])
            return set(param.shards)
        expert, part = shard
        if expert == "*":
            return super()._load_shard(param, tensor[local], shard)
        if not self.first <= expert < self.first + self.num_experts:
            return set()  # another rank's expert
        return super()._load_shard(param, tensor, (expert - self.first, part))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        local = (expert_ids >= self.first) & (expert_ids < self.first + self.num_experts)
        return self.tp.all_reduce(local_experts(x, expert_ids - self.first, weights, local, self))


def local_experts(x, expert_ids, weights, local, experts: FusedExperts) -> torch.Tensor:
    """The (token, choice) pairs routed to this rank's experts, grouped by expert, through
    their SwiGLU; other pairs contribute nothing."""
    num_tokens, top_k = expert_ids.shape
    flat_local = local.flatten()
    pairs = flat_local.nonzero().flatten()
    ids = expert_ids.flatten()[pairs]
    order = ids.argsort(stable=True)
    pairs, ids = pairs[order], ids[order]
    xs = x.index_select(0, pairs // top_k)
    out = torch.zeros(num_tokens * top_k, x.shape[1], dtype=x.dtype, device=x.device)
    counts = torch.bincount(ids, minlength=experts.num_experts).tolist()
    start = 0
    for expert, n in enumerate(counts):
        if n:
            act = kernels.silu_and_mul(F.linear(xs[start : start + n], experts.gate_up_proj[expert]))
            out[pairs[start : start + n]] = F.linear(act, experts.down_proj[expert])
            start += n
    per_choice = out.view(num_tokens, top_k, -1)
    return torch.bmm(torch.where(local, weights, 0).unsqueeze(1), per_choice).squeeze(1)


def _mark_sharded(module: nn.Module) -> None:
    """Its parameters go through their loaders even where a checkpoint name matches them
    whole (the loader narrows the full tensor to this rank's slice)."""
    for p in module.parameters(recurse=False):
        p.tp_sharded = True


def shard_model(model: QwenForCausalLM, tp: TensorParallel) -> None:
    """Replace the model's layers by this rank's shards (in place; before loading)."""
    c, dtype = model.config, model.dtype
    for layer in model.model.layers:
        _shard_attention(layer.self_attn, c, dtype, tp)
        if isinstance(layer.mlp, MLP):
            _shard_mlp(layer.mlp, c.hidden_size, c.intermediate_size, dtype, tp)
        elif isinstance(layer.mlp, SparseMoeBlock):
            experts = layer.mlp.experts
            if tp.expert_parallel:
                layer.mlp.experts = ExpertParallelExperts(
                    experts.num_experts, c.hidden_size, c.moe_intermediate_size, dtype=dtype, tp=tp)
            else:
                layer.mlp.experts = TensorParallelExperts(
                    experts.num_experts, c.hidden_size, tp.split(c.moe_intermediate_size, "moe_intermediate_size"),
                    dtype=dtype, tp=tp)
    model.model.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size, dtype=dtype, tp=tp)
    if model.lm_head is not None:
        model.lm_head = VocabParallelLMHead(c.hidden_size, c.vocab_size, dtype=dtype, tp=tp)


def _head_ranges(config, tp: TensorParallel) -> tuple[tuple[int, int], tuple[int, int]]:
    """(first query head, count), (first KV head, count) of this rank."""
    num_heads, num_kv = config.num_attention_heads, config.num_key_value_heads
    q_start, q_len = tp.split(num_heads, "num_attention_heads")
    if num_kv >= tp.size:
        return (q_start, q_len), tp.split(num_kv, "num_key_value_heads")
    if tp.size % num_kv:
        raise ValueError(f"tensor_parallel_size ({tp.size}) must divide or be a multiple of "
                         f"num_key_value_heads ({num_kv})")
    return (q_start, q_len), (q_start // (num_heads // num_kv), 1)  # replicated: the KV head of our queries


def _shard_attention(attn: Attention, config, dtype, tp: TensorParallel) -> None:
    (q_start, q_len), (kv_start, kv_len) = _head_ranges(config, tp)
    d = attn.head_dim
    attn.qkv_proj = ColumnParallelLinear(
        config.hidden_size, [(q_start * d, q_len * d), (kv_start * d, kv_len * d), (kv_start * d, kv_len * d)],
        bias=attn.qkv_proj.bias is not None, dtype=dtype, shard_names=("q", "k", "v"))
    attn.o_proj = RowParallelLinear((q_start * d, q_len * d), config.hidden_size,
                                    bias=attn.o_proj.bias is not None, dtype=dtype, tp=tp)
    attn.num_heads, attn.num_kv_heads = q_len, kv_len


def _shard_mlp(mlp: MLP, hidden_size: int, intermediate_size: int, dtype, tp: TensorParallel) -> None:
    start, length = tp.split(intermediate_size, "intermediate_size")
    mlp.gate_up_proj = ColumnParallelLinear(hidden_size, [(start, length), (start, length)], bias=False,
                                            dtype=dtype, shard_names=(0, 1))
    mlp.down_proj = RowParallelLinear((start, length), hidden_size, bias=False, dtype=dtype, tp=tp)


def build_sharded(model_class: type[QwenForCausalLM], config, *, dtype: torch.dtype, device: torch.device,
                  tp: TensorParallel) -> QwenForCausalLM:
    """The model with this rank's shards, built on `meta` and materialised on `device`."""
    with torch.device("meta"):
        model = model_class(config, dtype=dtype)
        shard_model(model, tp)
    attributes = {name: {k: v for k, v in vars(p).items()} for name, p in model.named_parameters()}
    model.to_empty(device=device)
    for name, p in model.named_parameters():  # to_empty makes new parameters: keep the loaders
        for key, value in attributes[name].items():
            setattr(p, key, value)
    rotary = model.model.rotary_emb  # a buffer computed at construction: meta had no values
    rotary.inv_freq = rope_inverse_frequencies(config.rope, config.head_dim)[0].to(device)
    return model
