"""Weight-only quantized matmuls and token embeddings, for CPU inference.

`quantize_modules` swaps chosen `Linear`s and embeddings of a model whose weights are not
loaded yet for the classes here, so the float matrices are never written (their
`torch.empty` pages are never touched) and every checkpoint tensor is quantized as it
arrives, a block of rows at a time.

Formats:

- ``int8``: w[n, k] = q[n, k] * scale[n], q in [-127, 127], one scale per output row, rounded
  *up* to a bfloat16 value before quantizing, so the bfloat16 scales the kernel takes are exact.
- ``int4``: w[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g], q in [0, 15], groups g of 32
  along k, bfloat16 scale and zero: what torch's `_weight_int4pack_mm_for_cpu` computes.
  GGUF Q4_K (q * d*sc - dmin*m per 32 values) maps onto it up to the bfloat16 rounding of
  scale and zero; floats are quantized from each group's min and max.
- ``gguf:Q5_0``, ``gguf:Q4_K``, ``gguf:Q5_K``, ``gguf:Q6_K`` (linears stored so in a GGUF,
  under "auto" where the native kernels run): the file's blocks as stored (5.5, 4.5, 5.5 and
  6.56 bits a value), multiplied by the native kernels (`kernels.GGUF_BLOCKS` lists the GGUF
  types with a kernel).
- experts of a sparse layer stored in GGUF K-quants (``ffn_gate_exps`` ... in Q4_K, Q5_K, Q6_K;
  a format per matrix, gate, up and down, as a Q4_K_M file mixes them): `GGUFExperts`, the
  file's blocks mapped as stored (file pages, not a copy), of which each step reads the experts
  its tokens are routed to, multiplied by the native MoE kernel (`kernels.gguf_experts`).
- ``gguf:<type>`` (embeddings only): the GGUF blocks as stored, mapped from the file (only
  the pages of rows gathered become resident); the rows a step gathers are dequantized by
  `gguf.quants`. Exact and the smallest, but it cannot serve as the lm_head.

The matmuls themselves (which kernel runs for which device, dtype and number of rows) are
`qwenkit.kernels`' `int8_linear`, `gguf_linear` and `int4_linear`; see docs/quantization.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit import kernels
from qwenkit.models.layers import Embedding, FusedExperts, Linear
from qwenkit.models.prequantized import StoredFormat, StoredQuantExperts, StoredQuantLinear

INT8, INT4, GGUF = "int8", "int4", "gguf"
Q5_0 = "gguf:Q5_0"  # a linear kept in GGUF Q5_0 blocks, run by the native kernel
Q4_K, Q5_K, Q6_K = "gguf:Q4_K", "gguf:Q5_K", "gguf:Q6_K"  # the same for GGUF K-quants
GGUF_LINEAR_FORMATS = tuple(f"{GGUF}:{type_name}" for type_name in kernels.GGUF_BLOCKS)
INT4_GROUP_SIZE = kernels.reference.INT4_GROUP_SIZE
# Rows are quantized in blocks of about this many values (4 MiB of float32).
_BLOCK_VALUES = 1 << 20


class LazyTensor(Protocol):
    """A checkpoint tensor read on demand, a block of rows (along dim 0) at a time.

    Where the checkpoint stores 4-bit groups of 32 with a scale and a min, `stores_int4` is
    true and `read_int4(start, stop)` gives (q uint8, scale, min), w = q * scale + min. GGUF
    tensors also have `ggml_type`, `read_raw(start, stop)` (uint8 rows of blocks) and
    `map_raw()` (all of them, mapped from the file).
    """

    shape: tuple[int, ...]

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) in float32."""


def materialize(tensor: torch.Tensor | LazyTensor) -> torch.Tensor:
    """The whole tensor (float32 for a lazy one)."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor.read_rows(0, tensor.shape[0])


def row_blocks(tensor: torch.Tensor | LazyTensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float32 rows) in blocks of about `_BLOCK_VALUES` values."""
    rows = tensor.shape[0]
    step = max(1, _BLOCK_VALUES // max(1, math.prod(tensor.shape[1:])))
    panel = max(kernels.PACKED_ROWS.values())  # whole panels where GGUF rows are packed together (`read_rows`)
    step = step // panel * panel or step
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = tensor[start:stop] if isinstance(tensor, torch.Tensor) else tensor.read_rows(start, stop)
        yield start, block.float()


# -- quantizers --------------------------------------------------------------------------------


def _bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 values >= x (x >= 0), as float32."""
    b = x.to(torch.bfloat16)
    up = (b.view(torch.int16) + 1).view(torch.bfloat16)
    return torch.where(b.float() < x, up, b).float()


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float -> (q int8 [..., N, K], scale float32 [..., N], bfloat16-exact).

    |w - q * scale| <= scale / 2, scale = amax(|w[n]|) / 127 rounded up to bfloat16."""
    w = w.float()
    amax = torch.maximum(w.amax(dim=-1), -w.amin(dim=-1))  # 10x faster here than an inf-norm
    scale = _bf16_ceil(amax / 127)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    # No clamp needed: the rounded-up scale keeps |w / scale| <= 127.
    q = (w / scale[..., None]).round_().to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, ...]:
    """[N, K] float -> (q uint8 [N, K] in 0..15, scale, zero float32 [N, K / group_size], bfloat16-exact).

    w ~ (q - 8) * scale + zero, scale = (max - min) / 15 of the group."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = _bf16_ceil((high - low) / 15)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = (low + 8 * scale).to(torch.bfloat16).float()
    q = ((groups - (zero - 8 * scale)[..., None]) / scale[..., None]).round_().clamp_(0, 15)
    return q.to(torch.uint8).reshape(n, k), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The float32 [N, K] the int4 kernel multiplies by (q uint8 [N, K]; scale, zero [N, K / 32])."""
    n, k = q.shape
    groups = q.float().reshape(n, scale.shape[1], -1)
    return ((groups - 8) * scale[..., None] + zero[..., None]).reshape(n, k)


def _check_shape(tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"expected shape {tuple(shape)}, got {tuple(tensor.shape)}")


def _int4_blocks(tensor) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
    """(first row, (q, scale, zero)) of `tensor`: exact from 4-bit checkpoint storage, else quantized."""
    exact = getattr(tensor, "stores_int4", False)
    step = max(1, _BLOCK_VALUES // tensor.shape[1])
    for start in range(0, tensor.shape[0], step):
        stop = min(tensor.shape[0], start + step)
        if exact:
            q, scale, low = tensor.read_int4(start, stop)
            yield start, (q, scale, low + 8 * scale)  # w = q*scale + low = (q - 8)*scale + zero
        else:
            rows = tensor[start:stop] if isinstance(tensor, torch.Tensor) else tensor.read_rows(start, stop)
            yield start, quantize_int4(rows)


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


# -- modules -----------------------------------------------------------------------------------


class QuantLinear(Linear):
    """`Linear` with an int8, int4 or GGUF-block weight; loads the same checkpoint tensors and shards.

    int8: weight int8 [N, K], scale bfloat16 [N]. int4: weight is torch's packed uint8 and
    scales_and_zeros bfloat16 [K / 32, N, 2]; shards are gathered unpacked and packed once
    the last one is in. GGUF formats ("gguf:Q5_0", ...): weight is the file's blocks in the
    kernels' layout (`kernels.gguf_pack`: Q5_0 8 rows interleaved, the K-quants as stored), uint8 [N, bytes
    per row] (every shard must be stored in that type). The bias stays in the model's dtype.

    A fused matrix whose shards are stored in different types (q and k in Q4_K next to v in Q6_K,
    as llama.cpp's Q4_K_M lays out about half the layers) takes a tuple of formats, one per shard
    (int8 or GGUF formats): `parts` holds one single-shard QuantLinear per shard in its own format
    (their tensors buffers, so the loader still sees one parameter, `weight`, empty here), and the
    output is theirs side by side. One format for the whole would requantize the K-quant shards
    to int8 (8 bits a value against 4.5 to 6.6).
    """

    def __init__(self, in_features: int, output_sizes: list[int], *, bias: bool, dtype: torch.dtype,
                 format: str | tuple[str, ...], shard_names: tuple = (None,)):
        super().__init__(in_features, output_sizes, bias=bias, dtype=dtype, shard_names=shard_names)
        n = sum(output_sizes)
        self.format = format
        self.in_features = in_features
        self.parts: nn.ModuleList | None = None
        if isinstance(format, tuple):
            if len(format) != len(output_sizes) or not set(format) <= {INT8, *GGUF_LINEAR_FORMATS}:
                raise ValueError(f"a format per part takes int8 or GGUF formats, one per shard: got {format!r}")
            self.parts = nn.ModuleList(QuantLinear(in_features, [size], bias=False, dtype=dtype, format=part_format)
                                       for size, part_format in zip(output_sizes, format))
            for part in self.parts:
                for name in ("weight", "scale"):
                    if hasattr(part, name):
                        tensor = getattr(part, name).data
                        delattr(part, name)
                        part.register_buffer(name, tensor)
            self.weight = _frozen(torch.empty(0, dtype=torch.uint8))
        elif format == INT8:
            self.weight = _frozen(torch.empty(n, in_features, dtype=torch.int8))
            self.register_buffer("scale", torch.empty(n, dtype=torch.bfloat16))
        elif format == INT4:
            if in_features % INT4_GROUP_SIZE or n % 16:
                raise ValueError(f"int4 needs in_features % {INT4_GROUP_SIZE} == 0 and out_features % 16 == 0")
            self.weight = _frozen(torch.empty(n, in_features // 2, dtype=torch.uint8))
            self.register_buffer(
                "scales_and_zeros", torch.empty(in_features // INT4_GROUP_SIZE, n, 2, dtype=torch.bfloat16)
            )
            self._unpacked: torch.Tensor | None = None  # uint8 [N, K] while shards arrive
            self._pending = set(shard_names)
        elif format in GGUF_LINEAR_FORMATS:
            self.ggml_type = format.partition(":")[2]
            self.weight = _frozen(torch.empty(n, kernels.gguf_row_bytes(self.ggml_type, in_features),
                                              dtype=torch.uint8))
        else:
            raise ValueError(f"unknown linear format {format!r}")
        self.weight.weight_loader = self._load_weight
        self.weight.shards = frozenset(shard_names)
        self.weight.reads_lazily = True

    @classmethod
    def from_linear(cls, linear: Linear, format: str) -> "QuantLinear":
        shard_names = tuple(sorted(linear.shard_index, key=linear.shard_index.get))
        return cls(linear.weight.shape[1], linear.output_sizes, bias=linear.bias is not None,
                   dtype=linear.weight.dtype, format=format, shard_names=shard_names)

    def _load_weight(self, param: nn.Parameter, tensor, shard) -> set:
        i = self.shard_index[shard]
        first, in_features = self.offsets[i], self.in_features
        _check_shape(tensor, (self.output_sizes[i], in_features))
        if self.parts is not None:
            self.parts[i]._load_weight(self.parts[i].weight, tensor, None)
            return {shard}
        if self.format == INT8:
            for start, rows in row_blocks(tensor):
                q, scale = quantize_int8(rows)
                target = slice(first + start, first + start + q.shape[0])
                param.data[target] = q
                self.scale[target] = scale
            return {shard}
        if self.format in GGUF_LINEAR_FORMATS:
            if getattr(getattr(tensor, "ggml_type", None), "name", None) != self.ggml_type:
                raise ValueError(f"expected {self.ggml_type} blocks, got {getattr(tensor, 'ggml_type', 'floats')}")
            together = kernels.PACKED_ROWS[self.ggml_type]  # rows packed together (Q5_0: 8)
            if first % together or tensor.shape[0] % together:
                raise ValueError(f"{self.ggml_type} rows are packed {together} at a time: rows {first} to "
                                 f"{first + tensor.shape[0]} are not whole groups of them")
            step = kernels.packed_row_step(self.ggml_type, in_features)
            for start in range(0, tensor.shape[0], step):
                raw = tensor.read_raw(start, min(tensor.shape[0], start + step))
                param.data[first + start : first + start + raw.shape[0]] = kernels.gguf_pack(raw, in_features,
                                                                                             self.ggml_type)
            return {shard}
        if self._unpacked is None:
            self._unpacked = torch.empty(param.shape[0], in_features, dtype=torch.uint8)
        for start, (q, scale, zero) in _int4_blocks(tensor):
            target = slice(first + start, first + start + q.shape[0])
            self._unpacked[target] = q
            self.scales_and_zeros[:, target] = torch.stack([scale, zero], dim=-1).transpose(0, 1)
        self._pending.discard(shard)
        if not self._pending:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self._unpacked.int(), 1)
            param.data = packed.to(param.device)
            self._unpacked = None
        return {shard}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parts is not None:
            y = torch.cat([part(x) for part in self.parts], dim=-1)
        elif self.format == INT8:
            y = kernels.int8_linear(x, self.weight, self.scale)
        elif self.format in GGUF_LINEAR_FORMATS:
            y = kernels.gguf_linear(x, self.weight, self.in_features, self.ggml_type)
        else:
            y = kernels.int4_linear(x, self.weight, self.scales_and_zeros)
        return y if self.bias is None else y + self.bias


class QuantEmbedding(nn.Module):
    """Token embeddings as int8 rows with one bfloat16 scale each; `attend` is the tied lm_head."""

    format = INT8

    def __init__(self, num_embeddings: int, embedding_dim: int, *, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.weight = _frozen(torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(num_embeddings, dtype=torch.bfloat16))
        self.weight.weight_loader = self._load_weight
        self.weight.reads_lazily = True

    def _load_weight(self, param: nn.Parameter, tensor, shard) -> set:
        _check_shape(tensor, param.shape)
        for start, rows in row_blocks(tensor):
            q, scale = quantize_int8(rows)
            param.data[start : start + q.shape[0]] = q
            self.scale[start : start + q.shape[0]] = scale
        return {None}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight).to(self.dtype) * self.scale[input_ids, None].to(self.dtype)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int8_linear(x, self.weight, self.scale)


class GGUFEmbedding(nn.Module):
    """Token embeddings kept in their GGUF blocks (uint8 [vocab, bytes per row]); only the
    gathered rows are dequantized. Used when the embedding is not also the lm_head."""

    def __init__(self, num_embeddings: int, embedding_dim: int, ggml_type: str, *, dtype: torch.dtype):
        super().__init__()
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.ggml_type = GGMLQuantizationType[ggml_type]
        self.format = f"{GGUF}:{ggml_type}"
        block_size, type_size = GGML_QUANT_SIZES[self.ggml_type]
        if embedding_dim % block_size:
            raise ValueError(f"{ggml_type} rows need a multiple of {block_size} values")
        self.dtype = dtype
        self.embedding_dim = embedding_dim
        self.weight = _frozen(torch.empty(num_embeddings, embedding_dim // block_size * type_size, dtype=torch.uint8))
        self.weight.weight_loader = self._load_weight
        self.weight.reads_lazily = True

    def _load_weight(self, param: nn.Parameter, tensor, shard) -> set:
        _check_shape(tensor, (param.shape[0], self.embedding_dim))
        if getattr(tensor, "ggml_type", None) != self.ggml_type:
            raise ValueError(f"expected {self.ggml_type.name} blocks, got {getattr(tensor, 'ggml_type', 'floats')}")
        if hasattr(tensor, "map_raw") and param.device.type == "cpu":
            # A step gathers a few rows: mapped, only the pages of the rows it touched are resident
            # (as llama.cpp's mapped token embedding), not the whole table.
            param.data = tensor.map_raw()
            return {None}
        step = max(1, _BLOCK_VALUES // param.shape[1])
        for start in range(0, param.shape[0], step):
            raw = tensor.read_raw(start, min(param.shape[0], start + step))
            param.data[start : start + raw.shape[0]] = raw
        return {None}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        from gguf.quants import dequantize

        rows = self.weight[input_ids.flatten()].cpu().numpy()
        values = torch.from_numpy(dequantize(rows, self.ggml_type))
        return values.view(*input_ids.shape, self.embedding_dim).to(self.weight.device, self.dtype)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a GGUF-block embedding is not used as the lm_head")


class GGUFExperts(nn.Module):
    """The experts of one sparse layer in the GGUF K-quant blocks the file stores them in: `gate`,
    `up` uint8 [E, I, bytes per row of hidden], `down` [E, hidden, bytes per row of I] (buffers), of
    GGUF types `types` (gate, up, down; they may differ, as Q4_K_M's Q4_K gate/up and Q6_K down).

    On the CPU they are mapped from the file (a private, copy-on-write map, as `GGUFEmbedding`),
    not copied into memory of the process's own: file pages, which the kernel may drop under
    memory pressure and read again (as llama.cpp maps a model), rather than anonymous ones, which
    without swap it cannot. The map is populated at load (`map_raw(populate=True)`): mapped lazily,
    a step's first touch of an expert faulted its pages in one at a time, slower than the
    arithmetic. A step reads the blocks of the experts its tokens are routed to. The parameters
    `gate_up_proj` and `down_proj` are empty: they are what the loader fills (FusedExperts' names
    and shards)."""

    syncs_with_host = True  # the native call counts each expert's tokens on the host: no CUDA graphs

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, types: tuple[str, str, str]):
        super().__init__()
        if len(types) != 3 or not set(types) <= set(kernels.MOE_BLOCKS):
            raise ValueError(f"GGUF experts take {', '.join(kernels.MOE_BLOCKS)} blocks (gate, up, down): "
                             f"got {types!r}")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.types = types
        self.format = tuple(f"{GGUF}:{t}" for t in types)
        # (rows, values a row) of each matrix: gate and up [I, hidden], down [hidden, I]
        self._shapes = {"gate": (intermediate_size, hidden_size), "up": (intermediate_size, hidden_size),
                        "down": (hidden_size, intermediate_size)}
        for (name, (rows, k)), type_name in zip(self._shapes.items(), types):
            self.register_buffer(name, torch.empty(num_experts, rows, kernels.gguf_row_bytes(type_name, k),
                                                   dtype=torch.uint8))
        self.gate_up_proj = _frozen(torch.empty(0, dtype=torch.uint8))
        self.down_proj = _frozen(torch.empty(0, dtype=torch.uint8))
        self.gate_up_proj.shards = frozenset((e, j) for e in range(num_experts) for j in (0, 1))
        self.down_proj.shards = frozenset((e, 0) for e in range(num_experts))
        for param in (self.gate_up_proj, self.down_proj):
            param.weight_loader = self._load_shard
            param.reads_lazily = True

    @classmethod
    def from_experts(cls, experts: FusedExperts, types: tuple[str, str, str]) -> "GGUFExperts":
        num_experts, _, hidden = experts.gate_up_proj.shape
        return cls(num_experts, hidden, experts.intermediate_size, types)

    def _load_shard(self, param: nn.Parameter, tensor, shard: tuple) -> set:
        """shard = ("*": all experts stacked, as GGUF stores them; 0 gate or down, 1 up); None: all of
        down_proj (its checkpoint name is the parameter's)."""
        expert, part = ("*", 0) if shard is None else shard
        name = "down" if param is self.down_proj else ("gate", "up")[part]
        if expert != "*":
            raise ValueError("GGUF experts load from all experts stacked in one tensor")
        type_name = self.types[("gate", "up", "down").index(name)]
        if getattr(getattr(tensor, "ggml_type", None), "name", None) != type_name:
            raise ValueError(f"expected {type_name} blocks, got {getattr(tensor, 'ggml_type', 'floats')}")
        _check_shape(tensor, (self.num_experts, *self._shapes[name]))
        target = getattr(self, name)
        if hasattr(tensor, "map_raw"):  # mapped, not read: see the class doc
            blocks = tensor.map_raw(populate=True).view(target.shape)
        else:
            blocks = tensor.read_raw(0, self.num_experts).reshape(target.shape)
        setattr(self, name, blocks)
        return {(e, part) for e in range(self.num_experts)}

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden]; expert_ids, weights: [T, top_k]."""
        return kernels.gguf_experts(x, expert_ids, weights, self.gate, self.up, self.down, ",".join(self.types))


def quantized_module(module: nn.Module, format: str | tuple[str, ...] | StoredFormat) -> nn.Module:
    """The quantized counterpart of a `Linear`, `Embedding` or `FusedExperts` (not yet loaded);
    a `StoredFormat` keeps a pre-quantized checkpoint's tensors as stored (models/prequantized.py)."""
    if isinstance(format, StoredFormat):
        if type(module) is Linear:
            return StoredQuantLinear.from_linear(module, format)
        if type(module) is FusedExperts:
            return StoredQuantExperts.from_experts(module, format)
    elif type(module) is FusedExperts and isinstance(format, tuple) and all(f.startswith(f"{GGUF}:") for f in format):
        return GGUFExperts.from_experts(module, tuple(f.partition(":")[2] for f in format))
    elif type(module) is Linear and (isinstance(format, tuple) or format in (INT8, INT4, *GGUF_LINEAR_FORMATS)):
        return QuantLinear.from_linear(module, format)
    elif type(module) is Embedding:
        num_embeddings, embedding_dim = module.weight.shape
        if format == INT8:
            return QuantEmbedding(num_embeddings, embedding_dim, dtype=module.weight.dtype)
        kind, _, ggml_type = format.partition(":")
        if kind == GGUF:
            return GGUFEmbedding(num_embeddings, embedding_dim, ggml_type, dtype=module.weight.dtype)
    raise ValueError(f"cannot quantize {type(module).__name__} as {format!r}")


def quantize_modules(model: nn.Module, formats: dict[str, str | tuple[str, ...] | StoredFormat]) -> None:
    """Swap each module named in `formats` ({module name: format, or a format per shard}) for its quantized
    counterpart. Call before loading: the float weights replaced are never written."""
    for name, format in formats.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, quantized_module(getattr(parent, child), format))
