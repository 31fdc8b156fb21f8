"""Pre-quantized safetensors checkpoints: what their `quantization_config` says, and which modules
keep which stored format (qwenkit/models/prequantized.py).

A module is quantized where the checkpoint stores it so, read from the files' headers before any
weight: a `weight_scale_inv` (Qwen's FP8), a `qweight` (AWQ, GPTQ), a `weight_packed` or an e4m3
`weight` with a `weight_scale` (compressed-tensors). The lists of modules left in floats
(`modules_to_not_convert`, `ignore`) need not be parsed: what is not stored quantized loads as
floats. One stored format serves the whole checkpoint; a fused matrix (q/k/v, gate/up, an MoE
layer's experts) must be stored alike in all its parts.

Read, each as its producers write it:
- `fp8` (the Qwen team's `-FP8` releases, DeepSeek's layout): e4m3 weights, one float scale
  (`weight_scale_inv`, which multiplies) per `weight_block_size` block. The config's dynamic
  activation scheme (activations rounded to e4m3 per token and 128 features in vLLM) is not
  emulated: the weights are dequantized and the matmul runs in the activations' dtype.
- `awq` (AutoAWQ's GEMM version): 4-bit, zero points, groups along the input features.
- `gptq` (AutoGPTQ / GPTQModel): 4- or 8-bit, zero points stored one less in the original
  format (`checkpoint_format` "gptq"; not in "gptq_v2"), `g_idx` kept where `desc_act`.
- `compressed-tensors` (llm-compressor): `pack-quantized` integer weights (W4A16, W8A16, with or
  without zero points and group order) and `float-quantized` / `naive-quantized` FP8 weights
  (per tensor, channel or block) with dynamic per-token or per-group e4m3 activations or none.
Anything else is a ModelLoadError naming what is not read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from qwenkit.errors import ModelLoadError
from qwenkit.loader.weights import _target
from qwenkit.models.layers import Embedding, FusedExperts, Linear
from qwenkit.models.prequantized import FP8, INT, StoredFormat

_SCALE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class Prequantization:
    """What one checkpoint's `quantization_config` says: the stored format of its quantized
    matrices (`scale_dtype` still to be read from the files), the tensor that marks a module as
    quantized, and the parameter names of its tensors where they differ from the checkpoint's."""

    format: StoredFormat
    marker: str
    renames: Mapping[str, str]

    def plan(self, model: nn.Module, stored: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, StoredFormat]:
        """{module name: format} of the modules the checkpoint stores quantized, from its tensors'
        names and dtypes ({name: (dtype, shape)}); ModelLoadError where a module cannot be read."""
        params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        # our parameter holding the checkpoint matrix -> {shard: its tensors' last names}
        parts: dict[str, dict[object, set[str]]] = {}
        scale_dtypes: set[str] = set()
        for hf_name, (dtype, _) in stored.items():
            module, _, last = hf_name.rpartition(".")
            if last in ("input_scale", "k_scale", "v_scale"):
                raise ModelLoadError(f"checkpoint tensor {hf_name}: static activation and KV-cache scales "
                                     "are not supported (qwenkit reads weight-only and dynamic schemes)")
            target = _target(model, params, f"{module}.weight")
            if target is not None:
                parts.setdefault(target[0], {}).setdefault(target[1], set()).add(last)
            if last in ("scales", "weight_scale_inv", "weight_scale"):
                scale_dtypes.add(dtype)
        formats: dict[str, StoredFormat] = {}
        for param_name, shards in parts.items():
            marked = [shard for shard, names in shards.items() if self.marker in names]
            if not marked:
                continue
            owner, module = param_name.removesuffix(".weight"), modules.get(param_name.removesuffix(".weight"))
            matrices = [param_name]
            if not param_name.endswith(".weight"):  # an MoE layer's experts: both stacks alike
                owner = param_name.rpartition(".")[0]
                module = modules[owner]
                matrices = [f"{owner}.gate_up_proj", f"{owner}.down_proj"]
            for matrix in matrices:
                expected = getattr(params[matrix], "shards", {None})
                if {s for s, names in parts.get(matrix, {}).items() if self.marker in names} != set(expected):
                    raise ModelLoadError(f"{owner}: the checkpoint stores some of its parts quantized and others "
                                         "not; qwenkit keeps one format for a fused matrix and for a layer's experts")
            if type(module) is Embedding or owner == "lm_head" or owner.endswith(".mlp.gate"):
                raise ModelLoadError(f"{owner}: a quantized {'router' if owner.endswith('.gate') else owner} "
                                     "is not supported (published checkpoints keep it in floats)")
            if not isinstance(module, (Linear, FusedExperts)):
                raise ModelLoadError(f"{owner}: stored quantized, but it is not a matrix qwenkit quantizes")
            has_g_idx = any("g_idx" in names or "weight_g_idx" in names for names in shards.values())
            if self.format.act_order and not has_g_idx:
                raise ModelLoadError(f"{owner}: the config orders groups by activation (desc_act / actorder) "
                                     "but the checkpoint stores no g_idx")
            formats[owner] = replace(self.format, has_g_idx=has_g_idx)
        if formats:
            if len(scale_dtypes - {"F32", "F16", "BF16"}) or len(scale_dtypes) > 1:
                raise ModelLoadError(f"the checkpoint's scales are stored as {', '.join(sorted(scale_dtypes))}; "
                                     "qwenkit reads one float dtype (F32, F16 or BF16)")
            scale_dtype = _SCALE_DTYPES[scale_dtypes.pop()] if scale_dtypes else "float32"
            formats = {name: replace(f, scale_dtype=scale_dtype) for name, f in formats.items()}
        return formats


SUPPORTED = "fp8 (Qwen's block-wise e4m3), awq (GEMM), gptq and compressed-tensors"


def read_prequantization(config: Mapping[str, Any] | None) -> Prequantization | None:
    """The stored format `quantization_config` describes, None where there is none; ModelLoadError
    naming the method or the setting qwenkit does not read."""
    if not config:
        return None
    method = config.get("quant_method")
    reader = {"fp8": _fp8, "awq": _awq, "gptq": _gptq, "compressed-tensors": _compressed_tensors}.get(method)
    if reader is None:
        raise ModelLoadError(f"unsupported quantization method {method!r} in config.json; qwenkit reads {SUPPORTED}")
    return reader(config)


def _unsupported(method: str, what: str) -> ModelLoadError:
    return ModelLoadError(f"quantization_config ({method}): {what} is not supported")


def _fp8(c: Mapping[str, Any]) -> Prequantization:
    if c.get("fmt", "e4m3") != "e4m3":
        raise _unsupported("fp8", f"fmt {c.get('fmt')!r} (qwenkit reads e4m3)")
    if c.get("activation_scheme", "dynamic") != "dynamic":
        raise _unsupported("fp8", f"activation_scheme {c.get('activation_scheme')!r}")
    block = c.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise _unsupported("fp8", f"weight_block_size {block!r} (qwenkit reads block-wise scales, e.g. [128, 128])")
    return Prequantization(StoredFormat(FP8, "fp8", block=tuple(block)), "weight_scale_inv",
                           {"weight_scale_inv": "weight_scale"})


def _awq(c: Mapping[str, Any]) -> Prequantization:
    bits = c.get("bits", c.get("w_bit"))
    group = c.get("group_size", c.get("q_group_size"))
    version = str(c.get("version", "gemm")).lower()
    if version != "gemm":
        raise _unsupported("awq", f"version {version!r} (qwenkit reads AutoAWQ's GEMM packing)")
    if bits != 4:
        raise _unsupported("awq", f"bits {bits!r} (AWQ's GEMM packing is 4-bit)")
    if not c.get("zero_point", True):
        raise _unsupported("awq", "zero_point false")
    return Prequantization(StoredFormat(INT, "awq", bits=4, group_size=_group_size("awq", group), zero_point=True),
                           "qweight", {})


def _gptq(c: Mapping[str, Any]) -> Prequantization:
    bits = c.get("bits")
    if bits not in (4, 8):
        raise _unsupported("gptq", f"bits {bits!r} (qwenkit reads 4 and 8)")
    checkpoint_format = c.get("checkpoint_format", "gptq")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise _unsupported("gptq", f"checkpoint_format {checkpoint_format!r}")
    return Prequantization(
        StoredFormat(INT, "gptq", bits=bits, group_size=_group_size("gptq", c.get("group_size", 128)), zero_point=True,
                     zero_offset=1 if checkpoint_format == "gptq" else 0, act_order=bool(c.get("desc_act"))),
        "qweight", {})


def _group_size(method: str, group: Any) -> int:
    if group == -1:
        return 0
    if not isinstance(group, int) or group < 1:
        raise _unsupported(method, f"group_size {group!r}")
    return group


def _compressed_tensors(c: Mapping[str, Any]) -> Prequantization:
    method = "compressed-tensors"
    if c.get("quantization_status", "compressed") != "compressed":
        raise _unsupported(method, f"quantization_status {c.get('quantization_status')!r} (qwenkit reads compressed)")
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if c.get(key):
            raise _unsupported(method, key)
    groups = c.get("config_groups") or {}
    schemes = {repr((g.get("weights"), g.get("input_activations"), g.get("format"))): g for g in groups.values()
               if isinstance(g, dict)}
    if len(schemes) != 1:
        raise _unsupported(method, f"{len(schemes)} different config_groups (qwenkit reads one scheme)")
    (group,) = schemes.values()
    weights, acts = group.get("weights") or {}, group.get("input_activations")
    fmt = group.get("format") or c.get("format")
    bits, kind, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
    if weights.get("dynamic"):
        raise _unsupported(method, "dynamic weight scales")
    if fmt == "pack-quantized" and kind == "int" and bits in (4, 8) and strategy in ("group", "channel"):
        if acts:
            raise _unsupported(method, "integer weights with quantized activations")
        actorder = weights.get("actorder")
        if actorder not in (None, "group", "weight", "static"):
            raise _unsupported(method, f"actorder {actorder!r}")
        group_size = weights.get("group_size") if strategy == "group" else -1
        return Prequantization(
            StoredFormat(INT, method, bits=bits, group_size=_group_size(method, group_size),
                         zero_point=not weights.get("symmetric", True), act_order=actorder == "group"),
            "weight_packed",
            {"weight_packed": "qweight", "weight_scale": "scales", "weight_zero_point": "qzeros",
             "weight_g_idx": "g_idx"})
    if fmt in ("float-quantized", "naive-quantized") and kind == "float" and bits == 8:
        if not weights.get("symmetric", True):
            raise _unsupported(method, "asymmetric FP8 weights")
        block = {"tensor": (0, 0), "channel": (1, 0)}.get(strategy)
        if strategy == "block":
            block = tuple(weights.get("block_structure") or ())
        if not block or len(block) != 2:
            raise _unsupported(method, f"FP8 weight strategy {strategy!r}")
        activations = 0
        if acts:
            if acts.get("type") != "float" or acts.get("num_bits") != 8 or not acts.get("dynamic"):
                raise _unsupported(method, "input_activations other than dynamic FP8")
            activations = {"token": -1, "group": acts.get("group_size")}.get(acts.get("strategy"))
            if not isinstance(activations, int) or activations == 0:
                raise _unsupported(method, f"input_activations strategy {acts.get('strategy')!r}")
        return Prequantization(StoredFormat(FP8, method, block=block, activations=activations), "weight_scale", {})
    raise _unsupported(method, f"format {fmt!r} with {kind} {bits}-bit weights by {strategy} "
                               "(qwenkit reads pack-quantized int4 / int8 and FP8)")

