"""Weights of pre-quantized safetensors checkpoints, kept quantized in memory as the checkpoint
stores them: FP8 (e4m3 with block, per-channel or per-tensor scales) and 4- / 8-bit integers in
groups (AWQ, GPTQ, compressed-tensors' pack-quantized).

Every integer format is repacked at load, bit for bit, into one layout (GPTQ's, which the CUDA
kernels of AWQ and GPTQ read too): `qweight` int32 [K * bits / 32, N], input features packed
sequentially into each word; `scales` [G, N] in the checkpoint's dtype, G groups along K;
`qzeros` int32 [G, N * bits / 32] (absent where the format is symmetric: zero 2^(bits - 1));
`g_idx` int32 [shards, K] where a GPTQ checkpoint reorders its groups (desc_act). The value is
w[n, k] = (q[k, n] - (z[g, n] + zero_offset)) * s[g, n] with g = g_idx[k] or k // group_size
(`zero_offset` 1 for GPTQ's original format, which stores every zero one less).

FP8 keeps `weight` float8_e4m3fn [N, K] and `weight_scale` float32 [R, ceil(K / block_k)], one
row per block of `block_n` rows of each shard (R row blocks in all: the shards of a fused q/k/v
need not be whole blocks); w = weight * scale of its block (Qwen's `weight_scale_inv` multiplies,
despite the name).

The matmul (`stored_linear`) dequantizes the stored bits to the activations' dtype, a slice of
output features at a time, then multiplies in that dtype: float32 activations give
exactly the float model with the dequantized weights. Where the format quantizes activations
too (compressed-tensors FP8 with `input_activations`, dynamic), they are rounded to e4m3 with a
scale per token (or per group of a token's features) first, as the format's kernels do.
On CUDA Triton kernels read the packed words or the e4m3 bytes and dequantize per tile
(`kernels/cuda/w4a16.py`, `kernels/cuda/fp8.py`); g_idx-ordered groups take the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.kernels import cuda, reference
from qwenkit.models.layers import FusedExperts, Linear

FP8, INT = "fp8", "int"
FP8_MAX = 448.0  # the largest float8_e4m3fn value
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's GEMM layout: nibble i of a word holds column AWQ_ORDER[i] of 8
_DEQUANTIZE_VALUES = 1 << 22  # dequantized a slice of about this many weights at a time (16 MiB float32)


@dataclass(frozen=True)
class StoredFormat:
    """How a checkpoint stores one quantized matrix (all its shards and experts alike).

    kind: "fp8" or "int"; method: the checkpoint's quant_method ("fp8", "awq", "gptq",
    "compressed-tensors"), which says where its tensors are and how they are packed.
    int: `bits` (4 or 8), `group_size` (0: one group per row), `zero_point` (zeros stored),
    `zero_offset`, `act_order` (each input feature's group read from g_idx), `has_g_idx` (the
    checkpoint stores g_idx: kept where `act_order`, else checked to be the plain order).
    fp8: `block` (rows, columns) of one weight scale, 0 for the whole dimension of a shard; `activations`: 0 weight-only, -1 activations rounded to
    e4m3 with a dynamic scale per token, g > 0 per group of g features of a token.
    scale_dtype: the dtype of the stored scales (kept)."""

    kind: str
    method: str
    bits: int = 8
    group_size: int = 0
    zero_point: bool = False
    zero_offset: int = 0
    act_order: bool = False
    has_g_idx: bool = False
    block: tuple[int, int] = (0, 0)
    activations: int = 0
    scale_dtype: str = "float32"

    def __str__(self) -> str:
        if self.kind == FP8:
            scales = "tensor" if self.block == (0, 0) else "channel" if self.block == (1, 0) else "x".join(
                map(str, self.block))
            acts = "" if not self.activations else "+a8/token" if self.activations < 0 else f"+a8/{self.activations}"
            return f"{self.method}:fp8/{scales}{acts}"
        group = f"/g{self.group_size}" if self.group_size else "/channel"
        return f"{self.method}:int{self.bits}{group}" + ("+zeros" if self.zero_point else "") + (
            "+g_idx" if self.act_order else "")


# -- packing ------------------------------------------------------------------------------------


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their `32 / bits` unsigned values each, in order, along `dim` (0 or -1)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    mask = (1 << bits) - 1
    if dim == 0:
        values = (packed.unsqueeze(1) >> shifts[:, None]) & mask  # [rows, per word, cols]
        return values.reshape(-1, *packed.shape[1:])
    values = (packed.unsqueeze(-1) >> shifts) & mask
    return values.reshape(*packed.shape[:-1], -1)


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of `unpack_int32`: unsigned `bits`-bit values, `32 / bits` a word along `dim`."""
    per_word = 32 // bits
    values = values.to(torch.int32)
    if dim == 0:
        values = values.reshape(-1, per_word, *values.shape[1:]).movedim(1, -1)
    else:
        values = values.reshape(*values.shape[:-1], -1, per_word)
    out = torch.zeros(values.shape[:-1], dtype=torch.int32, device=values.device)
    for i in range(per_word):
        out |= values[..., i] << (bits * i)
    return out


def awq_to_columns(packed: torch.Tensor) -> torch.Tensor:
    """AWQ's GEMM packing [rows, N / 8] -> unsigned 4-bit values [rows, N] in column order."""
    nibbles = unpack_int32(packed, 4, dim=-1).reshape(*packed.shape, 8)
    order = torch.tensor(AWQ_ORDER, device=packed.device).argsort()  # column j is nibble order[j]
    return nibbles[..., order].reshape(*packed.shape[:-1], -1)


# -- dequantization and the matmul -------------------------------------------------------------


def dequantize_int(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                   g_idx: torch.Tensor | None, format: StoredFormat) -> torch.Tensor:
    """float32 [N, K] of one integer matrix in the layout above (g_idx [K] of its only shard)."""
    bits, groups = format.bits, scales.shape[0]
    q = unpack_int32(qweight, bits, dim=0)  # [K, N]
    if qzeros is None:
        zeros = torch.full_like(scales, 1 << (bits - 1), dtype=torch.int32)
    else:
        zeros = unpack_int32(qzeros, bits, dim=-1)[:, : scales.shape[1]] + format.zero_offset  # [G, N]
    if g_idx is None:
        group_size = format.group_size or q.shape[0]
        per_k = torch.arange(q.shape[0], device=q.device) // group_size
    else:
        per_k = g_idx.long()
    if g_idx is None and groups * (format.group_size or q.shape[0]) == q.shape[0]:
        w = (q.view(groups, -1, q.shape[1]) - zeros[:, None]).float() * scales[:, None].float()
        return w.view(q.shape).t()
    return ((q - zeros[per_k]).float() * scales[per_k].float()).t()


_E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def fp8_to_float(weight: torch.Tensor) -> torch.Tensor:
    """e4m3 -> float32, exactly. On the CPU a table of the 256 values: torch's conversion took
    ~6x as long there (135 ns a value)."""
    if weight.device.type != "cpu":
        return weight.float()
    return _E4M3_VALUES.index_select(0, weight.view(torch.uint8).flatten().long()).view(weight.shape)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, row_block: torch.Tensor, block_k: int) -> torch.Tensor:
    """float32 [N, K] = weight (e4m3 [N, K]) times the scale of each value's block; row_block [N]:
    the scale row of each weight row."""
    n, k = weight.shape
    scales = scale.float().index_select(0, row_block)  # [N, K blocks]
    values = fp8_to_float(weight)
    if k % block_k == 0:
        return (values.view(n, -1, block_k) * scales[:, :, None]).view(n, k)
    return values * scales.repeat_interleave(block_k, dim=1)[:, :k]


def quantize_fp8_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """x rounded to e4m3 with a dynamic scale per token (group -1) or per `group` features of a
    token (amax / 448, as vLLM and compressed-tensors compute it), returned dequantized in float32."""
    x = x.float()
    shaped = x if group < 0 else x.view(*x.shape[:-1], -1, group)
    scale = shaped.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    q = (shaped / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).view(x.shape)


class StoredMatrix(nn.Module):
    """The tensors of one quantized matrix [N, K] (several checkpoint matrices stacked on N, the
    shards), or of `num_experts` such matrices stacked in front ([E, ...] each; shards (expert, part)).

    Each tensor is a parameter with a `weight_loader` that takes the checkpoint's own tensor of one
    shard (and expert) and writes it in the layout above; shapes are checked against the matrix's,
    and a mismatch names what was expected."""

    def __init__(self, format: StoredFormat, in_features: int, output_sizes: list[int], *,
                 shard_names: tuple = (None,), num_experts: int = 0):
        super().__init__()
        self.format, self.in_features, self.output_sizes = format, in_features, output_sizes
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        self.shard_index = {name: i for i, name in enumerate(shard_names)}
        self.num_experts = num_experts
        lead = (num_experts,) if num_experts else ()
        shards = [(e, j) for e in range(num_experts) for j in range(len(output_sizes))] if num_experts else shard_names
        n, k = sum(output_sizes), in_features
        scale_dtype = getattr(torch, format.scale_dtype)
        if format.kind == FP8:
            block_n, block_k = format.block
            self.block_k = block_k or k
            blocks = [math.ceil(size / (block_n or size)) for size in output_sizes]
            self.block_offsets = [sum(blocks[:i]) for i in range(len(blocks))]
            row_block = [self.block_offsets[i] + r // (block_n or size)
                         for i, size in enumerate(output_sizes) for r in range(size)]
            self.register_buffer("row_block", torch.tensor(row_block, dtype=torch.int64), persistent=False)
            tensors = {"weight": ((n, k), torch.float8_e4m3fn),
                       "weight_scale": ((sum(blocks), math.ceil(k / self.block_k)), scale_dtype)}
        else:
            per_word = 32 // format.bits
            if k % per_word or any(size % per_word for size in output_sizes):
                raise ValueError(f"{format.bits}-bit weights pack {per_word} values a word: "
                                 f"{k} inputs, outputs {output_sizes}")
            self.num_groups = math.ceil(k / format.group_size) if format.group_size else 1
            tensors = {"qweight": ((k // per_word, n), torch.int32), "scales": ((self.num_groups, n), scale_dtype)}
            if format.zero_point:
                tensors["qzeros"] = ((self.num_groups, n // per_word), torch.int32)
            if format.has_g_idx:
                tensors["g_idx"] = ((len(output_sizes), k) if format.act_order else (0,), torch.int32)
            if format.method == "compressed-tensors":
                tensors["weight_shape"] = ((0,), torch.int64)  # checked, not kept
        for name, (shape, dtype) in tensors.items():
            param = nn.Parameter(torch.empty(*lead, *shape, dtype=dtype), requires_grad=False)
            param.weight_loader = self._loader(name)
            param.shards = frozenset(shards)
            param.reads_lazily = True
            self.register_parameter(name, param)

    # -- loading

    def _loader(self, name: str):
        def load(param: nn.Parameter, tensor, shard) -> set:
            expert, part = shard if self.num_experts else (None, self.shard_index[shard])
            if expert == "*":
                raise ValueError("stacked expert tensors are not read for quantized experts")
            target = param.data if expert is None else param.data[expert]
            stored = tensor.read() if hasattr(tensor, "read") else tensor
            getattr(self, f"_load_{self.format.kind}")(name, target, stored, part)
            return {shard}
        return load

    def _load_fp8(self, name: str, target: torch.Tensor, tensor: torch.Tensor, part: int) -> None:
        first, rows = self.offsets[part], self.output_sizes[part]
        if name == "weight":
            _expect(tensor, (rows, self.in_features), "weight", torch.float8_e4m3fn)
            target[first : first + rows] = tensor
            return
        block_n = self.format.block[0] or rows
        shape = (math.ceil(rows / block_n), target.shape[1])
        if tensor.numel() == 1 and shape == (1, 1):
            tensor = tensor.reshape(1, 1)  # a per-tensor scale, stored as [] or [1]
        elif tensor.dim() == 1 and shape[1] == 1:
            tensor = tensor[:, None]
        what = f"scales for a {rows} x {self.in_features} weight in blocks of {self.format.block}"
        _expect(tensor, shape, what)
        start = self.block_offsets[part]
        target[start : start + shape[0]] = tensor

    def _load_int(self, name: str, target: torch.Tensor, tensor: torch.Tensor, part: int) -> None:
        f, k = self.format, self.in_features
        first, rows = self.offsets[part], self.output_sizes[part]
        per_word = 32 // f.bits
        groups = self.num_groups
        group_text = f"{rows} x {k} weight in {groups} group{'s' * (groups > 1)}"
        if name == "weight_shape":
            if [int(v) for v in tensor.flatten()] != [rows, k]:
                raise ValueError(f"weight_shape {tensor.tolist()} does not match the model's {rows} x {k}")
            return
        if name == "g_idx":
            _expect(tensor, (k,), "g_idx")
            if not f.act_order:
                if not torch.equal(tensor.long(), torch.arange(k) // (f.group_size or k)):
                    raise ValueError("g_idx reorders the groups, but the config does not say desc_act / actorder")
                return
            if tensor.min() < 0 or tensor.max() >= groups:
                raise ValueError(f"g_idx names groups outside 0..{groups - 1}")
            target[part] = tensor
            return
        if f.method == "awq":  # qweight [K, N / 8], qzeros [G, N / 8] in AWQ's order; scales [G, N]
            if name == "scales":
                _expect(tensor, (groups, rows), f"scales for a {group_text}")
            else:
                _expect(tensor, (k if name == "qweight" else groups, rows // per_word), name, torch.int32)
                values = awq_to_columns(tensor)
                tensor = pack_int32(values, f.bits, dim=0 if name == "qweight" else -1)
        elif f.method == "gptq":  # already this layout
            shapes = {"qweight": (k // per_word, rows), "scales": (groups, rows), "qzeros": (groups, rows // per_word)}
            _expect(tensor, shapes[name], f"scales for a {group_text}" if name == "scales" else name,
                    None if name == "scales" else torch.int32)
        else:  # compressed-tensors: weight_packed [N, K / 8], weight_scale [N, G], zero points [N / 8, G]
            if name == "scales":
                _expect(tensor, (rows, groups), f"scales for a {group_text}")
                tensor = tensor.t()
            elif name == "qweight":
                _expect(tensor, (rows, k // per_word), "weight_packed", torch.int32)
                tensor = pack_int32(unpack_int32(tensor, f.bits, dim=-1).t(), f.bits, dim=0)
            else:
                _expect(tensor, (rows // per_word, groups), "weight_zero_point", torch.int32)
                tensor = pack_int32(unpack_int32(tensor, f.bits, dim=0).t(), f.bits, dim=-1)
        if name == "qzeros":
            target[:, first // per_word : (first + rows) // per_word] = tensor
        else:
            target[:, first : first + rows] = tensor

    # -- the matmul

    def dequantize(self, expert: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """float32 rows [start, stop) of the matrix (of `expert`'s); within one shard where
        g_idx is stored (each shard has its own)."""
        stop = sum(self.output_sizes) if stop is None else stop
        pick = (lambda t: t) if expert is None else (lambda t: t[expert])
        if self.format.kind == FP8:
            return dequantize_fp8(pick(self.weight)[start:stop], pick(self.weight_scale),
                                  self.row_block[start:stop], self.block_k)
        per_word = 32 // self.format.bits
        qzeros = getattr(self, "qzeros", None)
        g_idx = getattr(self, "g_idx", None) if self.format.act_order else None
        if g_idx is not None:
            g_idx = pick(g_idx)[max(i for i, o in enumerate(self.offsets) if o <= start)]
        return dequantize_int(pick(self.qweight)[:, start:stop], pick(self.scales)[:, start:stop],
                              None if qzeros is None else pick(qzeros)[:, start // per_word : -(-stop // per_word)],
                              g_idx, self.format)

    def slices(self) -> list[tuple[int, int]]:
        """Output rows dequantized together: ~`_DEQUANTIZE_VALUES` weights, within one shard
        where each shard has its own g_idx, whole words of packed zeros."""
        n = sum(self.output_sizes)
        step = max(32, _DEQUANTIZE_VALUES // self.in_features // 32 * 32)
        bounds = set(range(0, n, step)) | {n}
        if self.format.kind == INT and self.format.act_order:
            bounds |= set(self.offsets)
        bounds = sorted(bounds)
        return list(zip(bounds[:-1], bounds[1:]))

    def matmul(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """x [T, K] @ W^T -> [T, N] in x's dtype: on CUDA through the Triton kernels that read the
        stored bits (integer weights whose groups are in order: `kernels/cuda/w4a16.py`; FP8:
        `kernels/cuda/fp8.py`; the same numbers), else dequantized a slice at a time."""
        f = self.format
        if f.kind == INT and not f.act_order and cuda.applies(x):
            from qwenkit.kernels.cuda.w4a16 import int_weight_matmul

            pick = (lambda t: t) if expert is None else (lambda t: t[expert])
            qzeros = getattr(self, "qzeros", None)
            return int_weight_matmul(x, pick(self.qweight), pick(self.scales), None if qzeros is None else pick(qzeros),
                                     bits=f.bits, group_size=f.group_size, zero_offset=f.zero_offset)
        if self.format.kind == FP8 and self.format.activations:
            x = quantize_fp8_activations(x, self.format.activations).to(x.dtype)
        if f.kind == FP8 and cuda.applies(x):
            from qwenkit.kernels.cuda.fp8 import fp8_weight_matmul

            pick = (lambda t: t) if expert is None else (lambda t: t[expert])
            return fp8_weight_matmul(x, pick(self.weight), pick(self.weight_scale), self.row_block, self.block_k)
        parts = self.slices()
        if len(parts) == 1:
            return F.linear(x, self.dequantize(expert).to(x.dtype))
        out = x.new_empty(*x.shape[:-1], sum(self.output_sizes))
        for start, stop in parts:
            out[..., start:stop] = F.linear(x, self.dequantize(expert, start, stop).to(x.dtype))
        return out

    def stored_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


def _expect(tensor: torch.Tensor, shape: tuple[int, ...], what: str, dtype: torch.dtype | None = None) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{what}: expected shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if dtype is not None and tensor.dtype != dtype:
        raise ValueError(f"{what}: expected {dtype}, got {tensor.dtype}")


class StoredQuantLinear(StoredMatrix):
    """A `Linear` (`y = x W^T + b`, several checkpoint matrices stacked on N) whose weight stays as
    a pre-quantized checkpoint stores it; its tensors take the checkpoint's names (`qweight`,
    `scales`, `weight_scale`, ...) and shards, the bias stays in the model's dtype."""

    def __init__(self, in_features: int, output_sizes: list[int], *, bias: bool, dtype: torch.dtype,
                 format: StoredFormat, shard_names: tuple = (None,)):
        super().__init__(format, in_features, output_sizes, shard_names=shard_names)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(sum(output_sizes), dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self._load_bias
            self.bias.shards = frozenset(shard_names)

    def _load_bias(self, param: nn.Parameter, tensor: torch.Tensor, shard) -> set:
        i = self.shard_index[shard]
        _expect(tensor, (self.output_sizes[i],), "bias")
        param.data[self.offsets[i] : self.offsets[i] + self.output_sizes[i]] = tensor
        return {shard}

    @classmethod
    def from_linear(cls, linear: Linear, format: StoredFormat) -> "StoredQuantLinear":
        shard_names = tuple(sorted(linear.shard_index, key=linear.shard_index.get))
        return cls(linear.weight.shape[1], linear.output_sizes, bias=linear.bias is not None,
                   dtype=linear.weight.dtype, format=format, shard_names=shard_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class _ExpertMatrices:
    """What `reference.fused_experts` indexes as a stacked weight: `[e]` gives expert e's matrix,
    which the `linear` it is given multiplies by (`_expert_linear`)."""

    def __init__(self, stored: StoredMatrix, num_experts: int):
        self.stored = stored
        self.shape = (num_experts, sum(stored.output_sizes), stored.in_features)

    def __getitem__(self, expert: int) -> tuple[StoredMatrix, int]:
        return self.stored, expert


def _expert_linear(x: torch.Tensor, matrix: tuple[StoredMatrix, int]) -> torch.Tensor:
    stored, expert = matrix
    return stored.matmul(x, expert)


class StoredQuantExperts(FusedExperts):
    """The experts of one sparse layer, each expert's matrices as the checkpoint stores them
    (`experts.{e}.gate_proj.qweight`, ...): gate_up_proj and down_proj are `StoredMatrix`es with
    the experts stacked in front. Each step runs `reference.fused_experts`, one dequantizing matmul
    pair per expert in use; it reads the routing back to the host (`syncs_with_host`: no CUDA graph)."""

    syncs_with_host = True

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, format: StoredFormat):
        nn.Module.__init__(self)
        self.num_experts, self.intermediate_size, self.format = num_experts, intermediate_size, format
        self.gate_up_proj = StoredMatrix(format, hidden_size, [intermediate_size, intermediate_size],
                                         num_experts=num_experts)
        self.down_proj = StoredMatrix(format, intermediate_size, [hidden_size], num_experts=num_experts)

    @classmethod
    def from_experts(cls, experts: FusedExperts, format: StoredFormat) -> "StoredQuantExperts":
        num_experts, _, hidden = experts.gate_up_proj.shape
        return cls(num_experts, hidden, experts.intermediate_size, format=format)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return reference.fused_experts(x, expert_ids, weights, _ExpertMatrices(self.gate_up_proj, self.num_experts),
                                       _ExpertMatrices(self.down_proj, self.num_experts), linear=_expert_linear)
