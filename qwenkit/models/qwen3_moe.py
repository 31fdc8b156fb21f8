"""Qwen3-MoE (`model_type: qwen3_moe`): Qwen3 attention; the MLP of the layers chosen by
`decoder_sparse_step` and `mlp_only_layers` is a top-k mixture of experts with a float32
softmax router (`norm_topk_prob` renormalises the chosen weights)."""

from qwenkit.config import ModelConfig
from qwenkit.models.layers import BlockFlags, QwenForCausalLM


class Qwen3MoeForCausalLM(QwenForCausalLM):
    @classmethod
    def block_flags(cls, config: ModelConfig) -> BlockFlags:
        return BlockFlags(
            qkv_bias=config.attention_bias, o_bias=config.attention_bias, qk_norm=True, sparse_moe=True
        )
