"""Qwen2 / Qwen2.5 / QwQ (`model_type: qwen2`): biases on q/k/v, none on o; no q/k norm."""

from qwenkit.config import ModelConfig
from qwenkit.models.layers import BlockFlags, QwenForCausalLM


class Qwen2ForCausalLM(QwenForCausalLM):
    @classmethod
    def block_flags(cls, config: ModelConfig) -> BlockFlags:
        return BlockFlags(qkv_bias=True, o_bias=False, qk_norm=False)
