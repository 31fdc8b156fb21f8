"""One file per architecture, found through `model_type`."""

from qwenkit.models.layers import QwenForCausalLM
from qwenkit.models.qwen2 import Qwen2ForCausalLM
from qwenkit.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from qwenkit.models.qwen3 import Qwen3ForCausalLM
from qwenkit.models.qwen3_vl import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration
from qwenkit.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[QwenForCausalLM]] = {
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
    "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
}

__all__ = ["MODEL_REGISTRY", "QwenForCausalLM"]
