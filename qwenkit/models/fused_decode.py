"""The decoder layers of a CPU decode step as one native call.

A decode step of the default model is 24 layers of about twenty small operations each
(norms, the quantized matmuls, bias, RoPE, the cache write, attention, SiLU-and-mul,
residual adds). Run as torch modules, what is not matmul cost ~8.5 ms of a ~40 ms step
at one token (measured: docs/decode.md): Python, module calls, tensor allocation and
dispatch, none of it arithmetic. Here the whole stack after the embedding is
`qwenkit.kernels.DecodeLayers`: one call that walks the layers in C, calling the kernels the
module path calls one at a time, so the numbers are those of the module path up to float
summation order.

It applies where every matmul of every layer has a native kernel: a CPU model with dense MLPs
(not MoE), each projection an int8 or GGUF (Q5_0, Q4_K, Q5_K, Q6_K) `QuantLinear` (or one with a
format per shard), and the
kernels built. `FusedDecode.build` returns None otherwise and the runner keeps the module path.
`QWENKIT_NATIVE_KERNELS=0` turns it off with the other kernels.

Whatever the model's dtype, the fused step computes in float32 (the quantized matmuls take
float32 activations anyway): a bfloat16 model (the default where the CPU has AVX512-BF16 or
AMX) decodes through it too, next to its bfloat16 prefill on the CPU's matrix units, reading
and writing its bfloat16 KV cache. Its rows then differ from the bfloat16 module path's by that
path's roundings to bfloat16 between operations (tests/test_fused_decode.py bounds it).
"""

from __future__ import annotations

import torch

from qwenkit import kernels
from qwenkit.models.attention import AttentionMetadata
from qwenkit.models.layers import MLP, QwenForCausalLM
from qwenkit.models.quant import INT8, QuantLinear


def _linear(module) -> kernels.DecodeLinear | None:
    """The kernel's view of a projection, or None where it is not quantized."""
    if not isinstance(module, QuantLinear):
        return None
    if module.parts is not None:  # a format per shard
        return kernels.DecodeLinear("parts", None, module.in_features, bias=module.bias,
                                    parts=tuple(map(_linear, module.parts)))
    kind = module.format if module.format == INT8 else module.format.partition(":")[2]
    scale = module.scale if module.format == INT8 else None
    return kernels.DecodeLinear(kind, module.weight, module.in_features, scale, module.bias)


class FusedDecode:
    """Decode steps of `model` through `kernels.DecodeLayers`; built by `build`, which says whether it applies."""

    def __init__(self, model: QwenForCausalLM, layers: kernels.DecodeLayers):
        self.model = model
        self._layers = layers

    @classmethod
    def build(cls, model: QwenForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> FusedDecode | None:
        """The fused path for this model and cache, or None where it does not apply (see the module doc)."""
        c = model.config
        layers = []
        for layer, (k_cache, v_cache) in zip(model.model.layers, kv_caches):
            attn, mlp = layer.self_attn, layer.mlp
            if not isinstance(mlp, MLP):
                return None
            linears = [_linear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if None in linears:
                return None
            layers.append(kernels.DecodeLayer(
                *linears, layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                attn.q_norm.weight if attn.q_norm is not None else None,
                attn.k_norm.weight if attn.k_norm is not None else None, k_cache, v_cache))
        fused = kernels.DecodeLayers.build(
            layers, hidden=c.hidden_size, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, intermediate=c.intermediate_size, eps=c.rms_norm_eps,
            scale=model.model.layers[0].self_attn.scale)
        return None if fused is None else cls(model, fused)

    @staticmethod
    def applies(num_seqs: int) -> bool:
        """Whether the module path would also run the native kernels on `num_seqs` rows: then
        the fused step computes the same."""
        return kernels.DecodeLayers.applies(num_seqs)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states [num_seqs, hidden] (after the last norm) of a decode step: input_ids,
        positions [num_seqs] and the step's decode metadata, as the module path takes them."""
        d = meta.decode
        inner = self.model.model
        cos, sin = inner.rotary_emb(positions)
        h = self._layers(inner.embed_tokens(input_ids), cos, sin, meta.slot_mapping, d.block_tables,
                         d.block_size, d.context_lens)
        return inner.norm(h.to(self.model.dtype))
