"""The generic weight loader: `(hf_name, tensor)` pairs into a model's parameters.

Checkpoint names are kept as Hugging Face writes them. The model's
`packed_modules_mapping` says which of them live inside a fused parameter
(`q_proj -> qkv_proj`, `gate_proj -> gate_up_proj`); per-expert MoE matrices
(`mlp.experts.{e}.gate_proj.weight`) and stacked ones (`mlp.experts.gate_proj`, as
GGUF stores them) go into the `[num_experts, ...]` tensors. Quantized parameters
(qwenkit/models/quant.py) take the same names and shards; those of a pre-quantized checkpoint
(qwenkit/models/prequantized.py) the checkpoint's own tensor names after the module's
(`q_proj.qweight -> qkv_proj.qweight`, `experts.3.up_proj.weight_scale_inv ->
experts.gate_up_proj.weight_scale`, through `renames`). At the end every
parameter must have been filled and every tensor used, else ModelLoadError names it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from qwenkit.engine.host_memory import return_freed_memory
from qwenkit.errors import ModelLoadError
from qwenkit.models.quant import LazyTensor, materialize

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(?:(\d+)\.)?(gate_proj|up_proj|down_proj)(?:\.(\w+))?$")
_EXPERT_PARTS = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0)}
# Buffers some checkpoints carry that are recomputed from the config here.
_DERIVED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor | LazyTensor]], *,
                 renames: Mapping[str, str] | None = None) -> None:
    """Fill `model`'s parameters from `weights`; raise ModelLoadError if any is missing or unused.

    A lazy tensor is read whole for a float parameter and handed as is to a quantized one
    (`reads_lazily`), which reads it a block of rows at a time. renames: the parameter name of
    a checkpoint tensor's last name part where they differ (`weight_scale_inv -> weight_scale`)."""
    params = dict(model.named_parameters())
    filled: dict[str, set] = {name: set() for name in params}
    unused: list[str] = []
    tied = getattr(model, "lm_head", True) is None
    prefixes = getattr(model, "checkpoint_prefixes", {})
    convert = getattr(model, "convert_checkpoint_tensor", None)
    for hf_name, tensor in weights:
        # A vision-language checkpoint's towers (`visual.`, `model.language_model.`), named as the model's.
        prefix = next((p for p in prefixes if hf_name.startswith(p)), None)
        if prefix is not None:
            hf_name = prefixes[prefix] + hf_name[len(prefix):]
        # An embedding checkpoint (Qwen3-Embedding) is a Qwen3Model's: its names lack "model.".
        elif not hf_name.startswith(("model.", "lm_head.")) and hasattr(model, "model"):
            hf_name = f"model.{hf_name}"
        if _DERIVED.search(hf_name) or (tied and hf_name == "lm_head.weight"):
            continue
        if convert is not None:  # a layout of its own (Qwen3-VL-MoE's published experts, transposed)
            tensor = convert(hf_name, tensor)
        target = _target(model, params, _renamed(hf_name, renames))
        if target is None:
            unused.append(hf_name)
            continue
        name, shard = target
        param = params[name]
        try:
            if getattr(param, "reads_lazily", False):  # quantized: reads and converts a block of rows at a time
                filled[name] |= param.weight_loader(param, tensor, shard)
                # glibc keeps the freed blocks of the dequantization temporaries (a few MB each)
                # for reuse; their scattered remains added ~25 MB to a quantized load's peak RSS.
                return_freed_memory()
                continue
            tensor = materialize(tensor).to(param.device)
            if shard is None and not getattr(param, "tp_sharded", False):
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(f"expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
                param.data.copy_(tensor)
                filled[name] |= set(getattr(param, "shards", {None}))
            else:
                filled[name] |= param.weight_loader(param, tensor, shard)
        except ValueError as e:
            raise ModelLoadError(f"checkpoint tensor {hf_name}: {e}") from None
    if unused:
        more = f" (and {len(unused) - 5} more)" if len(unused) > 5 else ""
        raise ModelLoadError(f"checkpoint tensors the model does not use: {', '.join(unused[:5])}{more}")
    missing = [n for n, p in params.items() if filled[n] != set(getattr(p, "shards", {None}))]
    if missing == ["lm_head.weight"] and filled:
        # No lm_head at all: an embedding model, which computes hidden states, never logits.
        model.lm_head = None
        model.is_headless = True
        return
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"checkpoint is missing tensors for: {', '.join(missing[:5])}{more}")


def _renamed(hf_name: str, renames: Mapping[str, str] | None) -> str:
    module, _, last = hf_name.rpartition(".")
    return f"{module}.{renames[last]}" if renames and last in renames else hf_name


def _target(model: nn.Module, params: dict[str, nn.Parameter], hf_name: str) -> tuple[str, object] | None:
    """The parameter (and shard within it) that checkpoint tensor `hf_name` fills."""
    if hf_name in params:
        return hf_name, None
    m = _EXPERT.match(hf_name)
    if m:
        prefix, expert, part, suffix = m.groups()
        fused, index = _EXPERT_PARTS[part]
        # Float experts are one parameter each; quantized ones a module of tensors (`gate_up_proj.qweight`).
        names = [f"{prefix}.{fused}.{suffix or 'weight'}"]
        if suffix in (None, "weight"):
            names.append(f"{prefix}.{fused}")
        for name in names:
            if name in params:
                return name, ("*" if expert is None else int(expert), index)
        return None
    for hf_part, (fused, shard) in model.packed_modules_mapping.items():
        marker = f".{hf_part}."
        if marker in hf_name:
            name = hf_name.replace(marker, f".{fused}.")
            if name in params:
                return name, shard
    return None
