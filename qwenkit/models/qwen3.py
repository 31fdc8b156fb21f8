"""Qwen3 dense (`model_type: qwen3`): per-head RMSNorm on q and k before RoPE, explicit
`head_dim`, no bias unless `attention_bias` says so."""

from qwenkit.config import ModelConfig
from qwenkit.models.layers import BlockFlags, QwenForCausalLM


class Qwen3ForCausalLM(QwenForCausalLM):
    @classmethod
    def block_flags(cls, config: ModelConfig) -> BlockFlags:
        return BlockFlags(qkv_bias=config.attention_bias, o_bias=config.attention_bias, qk_norm=True)
