"""Model and generation configs: frozen dataclasses built once from `config.json`
(+ `generation_config.json`) or from GGUF metadata turned into the same dict.

Both the key names of published Qwen checkpoints (`rope_theta`, `rope_scaling`,
`num_experts`, `torch_dtype`) and those newer transformers versions write
(`rope_parameters`, `num_local_experts`, `dtype`) are accepted. Keys that qwenkit does
not know are reported through `logging`, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenkit.errors import ModelLoadError

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "qwen3_moe")

# Keys that only matter for training or for other libraries; read and deliberately unused.
_IGNORED_KEYS = frozenset(
    {
        "architectures", "attention_dropout", "initializer_range", "use_cache",
        "transformers_version", "router_aux_loss_coef", "output_router_logits",
        "pad_token_id", "torch_dtype", "dtype", "model_type", "bos_token_id",
        "eos_token_id", "max_window_layers", "layer_types", "use_sliding_window",
        "sliding_window", "_name_or_path", "name_or_path", "tie_word_embeddings",
        "output_hidden_states", "output_attentions", "return_dict", "is_decoder",
        "use_return_dict", "chunk_size_feed_forward", "pruned_heads", "id2label",
        "label2id", "problem_type", "tokenizer_class", "prefix", "sep_token_id",
        "decoder_start_token_id", "task_specific_params", "finetuning_task",
        "keys_to_ignore_at_inference", "use_qk_norm", "rope_scaling",
        "rope_parameters", "rope_theta", "num_local_experts", "num_experts",
        "partial_rotary_factor", "pretraining_tp",
    }
)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters. `rope_type` is "default", "linear" or "yarn"."""

    rope_theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    @classmethod
    def from_hf(cls, d: dict[str, Any], *, max_position_embeddings: int) -> "RopeConfig":
        """Build from the config.json keys: `rope_theta` + `rope_scaling`, or `rope_parameters`."""
        params = dict(d.get("rope_parameters") or {})
        scaling = d.get("rope_scaling")
        if scaling:
            params = {**params, **scaling}
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in ("default", "linear", "yarn"):
            raise ModelLoadError(
                f"unsupported rope_scaling type {rope_type!r} (qwenkit supports default, linear and yarn)"
            )
        factor = float(params.get("factor") or 1.0)
        original = params.get("original_max_position_embeddings", d.get("original_max_position_embeddings"))
        if rope_type == "yarn" and original is None:
            original = int(max_position_embeddings / factor)
        return cls(
            rope_theta=float(theta),
            rope_type=rope_type,
            factor=factor,
            original_max_position_embeddings=None if original is None else int(original),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            attention_factor=params.get("attention_factor"),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=bool(params.get("truncate", True)),
        )


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of one Qwen-family checkpoint."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope: RopeConfig
    hidden_act: str = "silu"
    attention_bias: bool = False
    # Mixture of experts (Qwen3-MoE); num_experts == 0 means dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # The dtype the checkpoint was saved in ("bfloat16", "float32", ...), if known.
    checkpoint_dtype: str | None = None
    unknown_keys: tuple[str, ...] = field(default=(), compare=False)

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` uses the sparse (MoE) MLP."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed `config.json`. Raises ModelLoadError for unsupported models."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = ", ".join(d.get("architectures") or []) or "unknown architecture"
            raise ModelLoadError(
                f"unsupported model_type {model_type!r} ({archs}); qwenkit runs "
                + ", ".join(SUPPORTED_MODEL_TYPES)
            )
        if d.get("quantization_config"):
            method = d["quantization_config"].get("quant_method", "unknown")
            raise ModelLoadError(
                f"pre-quantized safetensors checkpoints ({method}) are not supported; "
                "use the unquantized checkpoint or a GGUF file"
            )
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            max_pos = int(d.get("max_position_embeddings", 32768))
            kwargs: dict[str, Any] = dict(
                model_type=model_type,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                max_position_embeddings=max_pos,
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                rope=RopeConfig.from_hf(d, max_position_embeddings=max_pos),
                hidden_act=d.get("hidden_act", "silu"),
                checkpoint_dtype=d.get("dtype") or d.get("torch_dtype"),
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json is missing the key {e.args[0]!r}") from None
        if kwargs["hidden_act"] != "silu":
            raise ModelLoadError(f"unsupported hidden_act {kwargs['hidden_act']!r} (Qwen models use silu)")
        if d.get("use_sliding_window"):
            logger.warning("use_sliding_window is set; qwenkit attends to the full context (as Qwen2.5 ships)")
        kwargs["attention_bias"] = bool(d.get("attention_bias", False))
        if model_type == "qwen3_moe":
            kwargs.update(
                num_experts=int(d.get("num_experts", d.get("num_local_experts", 0))),
                num_experts_per_tok=int(d["num_experts_per_tok"]),
                moe_intermediate_size=int(d["moe_intermediate_size"]),
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                decoder_sparse_step=int(d.get("decoder_sparse_step", 1)),
                mlp_only_layers=tuple(int(i) for i in d.get("mlp_only_layers") or ()),
            )
        consumed = {f.name for f in dataclasses.fields(cls)}
        unknown = tuple(sorted(k for k in d if k not in consumed and k not in _IGNORED_KEYS))
        if unknown:
            logger.warning("config keys qwenkit does not use: %s", ", ".join(unknown))
        return cls(**kwargs, unknown_keys=unknown)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Read a `config.json` file."""
        return cls.from_hf(read_json(path))


@dataclass(frozen=True)
class GenerationConfig:
    """What `generation_config.json` says: end-of-turn ids and default sampling values."""

    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    do_sample: bool | None = None

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "GenerationConfig":
        eos = d.get("eos_token_id")
        if eos is None:
            eos_ids: tuple[int, ...] = ()
        elif isinstance(eos, int):
            eos_ids = (eos,)
        else:
            eos_ids = tuple(int(i) for i in eos)
        names = {f.name for f in dataclasses.fields(cls)} - {"eos_token_ids"}
        return cls(eos_token_ids=eos_ids, **{k: d[k] for k in names if d.get(k) is not None})


def read_json(path: str | Path) -> dict[str, Any]:
    """Parse a JSON file, turning failures into ModelLoadError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
