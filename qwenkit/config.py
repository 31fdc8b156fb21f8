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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenkit.errors import ModelLoadError
from qwenkit.sampling_fields import MODEL_DEFAULTS, SamplingField

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "qwen3_moe", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# Vision-language checkpoints: the language model's keys sit in `text_config` (transformers 5) or at
# the top (published Qwen2.5-VL); the vision tower's in `vision_config` (qwenkit/models/qwen2_5_vl.py).
VISION_MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# Pre-quantized safetensors checkpoints qwenkit loads as stored (qwenkit/loader/prequantized.py).
QUANT_METHODS = ("fp8", "awq", "gptq", "compressed-tensors")

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
        "partial_rotary_factor", "pretraining_tp", "text_config", "vision_end_token_id",
        "vision_token_id", "image_token_index", "video_token_index", "mm_tokens_per_image",
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
        f, top = _Fields(params, "config.json rope_scaling"), _Fields(d, "config.json")
        theta = f.number("rope_theta", top.number("rope_theta", 10000.0))
        rope_type = f.string("rope_type", None) or f.string("type", None) or "default"
        if rope_type not in ("default", "linear", "yarn"):
            raise ModelLoadError(
                f"unsupported rope_scaling type {rope_type!r} (qwenkit supports default, linear and yarn)"
            )
        factor = f.positive_number("factor", 1.0)
        original = f.positive_integer("original_max_position_embeddings",
                                      top.positive_integer("original_max_position_embeddings", None))
        if rope_type == "yarn" and original is None:
            original = int(max_position_embeddings / factor)
        return cls(
            rope_theta=theta,
            rope_type=rope_type,
            factor=factor,
            original_max_position_embeddings=original,
            beta_fast=f.number("beta_fast", 32.0),
            beta_slow=f.number("beta_slow", 1.0),
            attention_factor=f.number("attention_factor", None),
            mscale=f.number("mscale", None),
            mscale_all_dim=f.number("mscale_all_dim", None),
            truncate=f.boolean("truncate", True),
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
    # A pre-quantized checkpoint's `quantization_config`, as written (qwenkit/loader/prequantized.py reads it).
    quantization_config: dict[str, Any] | None = field(default=None, compare=False)
    # Vision-language models: the raw `vision_config` (read by the model file), the placeholder and
    # marker token ids, and the multimodal rotary sections (M-RoPE: [t, h, w] frequency counts).
    vision_config: dict[str, Any] | None = field(default=None, compare=False)
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    mrope_section: tuple[int, ...] = ()
    mrope_interleaved: bool = False
    unknown_keys: tuple[str, ...] = field(default=(), compare=False)

    @property
    def is_vision(self) -> bool:
        """Whether the checkpoint reads images (a vision tower and M-RoPE)."""
        return self.vision_config is not None

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` uses the sparse (MoE) MLP."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed `config.json`. Raises ModelLoadError, naming the key, for an
        unsupported model or a value of the wrong type or range."""
        if not isinstance(d, dict):
            raise ModelLoadError(f"config.json must hold a JSON object, got {_type_name(d)}")
        f = _Fields(d, "config.json")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = ", ".join(f.strings("architectures") or ()) or "unknown architecture"
            raise ModelLoadError(
                f"unsupported model_type {model_type!r} ({archs}); qwenkit runs "
                + ", ".join(SUPPORTED_MODEL_TYPES)
            )
        f.strings("architectures")
        vision: dict[str, Any] = {}
        if model_type in VISION_MODEL_TYPES:
            d, vision = _flatten_vision_config(d, f)
            f = _Fields(d, "config.json")
        quantization = f.mapping("quantization_config")
        if quantization and quantization.get("quant_method") not in QUANT_METHODS:
            raise ModelLoadError(
                f"unsupported quantization method {quantization.get('quant_method')!r} in config.json "
                f"(quantization_config); qwenkit reads {', '.join(QUANT_METHODS)}"
            )
        hidden = f.positive_integer("hidden_size")
        heads = f.positive_integer("num_attention_heads")
        max_pos = f.positive_integer("max_position_embeddings", 32768)
        kv_heads = f.positive_integer("num_key_value_heads", heads)
        if heads % kv_heads:
            raise ModelLoadError(f"config.json: num_attention_heads ({heads}) must be a multiple of "
                                 f"num_key_value_heads ({kv_heads})")
        f.mapping("rope_scaling")
        f.mapping("rope_parameters")
        kwargs: dict[str, Any] = dict(
            model_type=model_type,
            vocab_size=f.positive_integer("vocab_size"),
            hidden_size=hidden,
            intermediate_size=f.positive_integer("intermediate_size"),
            num_hidden_layers=f.positive_integer("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=f.positive_integer("head_dim", hidden // heads),
            max_position_embeddings=max_pos,
            rms_norm_eps=f.positive_number("rms_norm_eps", 1e-6),
            tie_word_embeddings=f.boolean("tie_word_embeddings", False),
            rope=RopeConfig.from_hf(d, max_position_embeddings=max_pos),
            hidden_act=f.string("hidden_act", "silu"),
            checkpoint_dtype=f.string("dtype", None) or f.string("torch_dtype", None),
            quantization_config=quantization or None,
        )
        if kwargs["hidden_act"] != "silu":
            raise ModelLoadError(f"unsupported hidden_act {kwargs['hidden_act']!r} (Qwen models use silu)")
        if f.boolean("use_sliding_window", False):
            logger.warning("use_sliding_window is set; qwenkit attends to the full context (as Qwen2.5 ships)")
        kwargs["attention_bias"] = f.boolean("attention_bias", False)
        if model_type in ("qwen3_moe", "qwen3_vl_moe"):
            kwargs.update(
                num_experts=f.integer("num_experts", f.integer("num_local_experts", 0)),
                num_experts_per_tok=f.positive_integer("num_experts_per_tok"),
                moe_intermediate_size=f.positive_integer("moe_intermediate_size"),
                norm_topk_prob=f.boolean("norm_topk_prob", False),
                decoder_sparse_step=f.positive_integer("decoder_sparse_step", 1),
                mlp_only_layers=tuple(f.ints("mlp_only_layers")),
            )
        kwargs.update(vision)
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
    """What `generation_config.json` says: end-of-turn ids and default sampling values.

    `sampling`: name -> value of each field of the sampling table that the file sets among
    those a model may give defaults for (`sampling_fields.MODEL_DEFAULTS`), typed and
    range-checked by its row."""

    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    sampling: Mapping[str, float] = field(default_factory=dict, hash=False)
    do_sample: bool | None = None

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "GenerationConfig":
        """Build from a parsed `generation_config.json`; ModelLoadError names a mistyped key."""
        if not isinstance(d, dict):
            raise ModelLoadError(f"generation_config.json must hold a JSON object, got {_type_name(d)}")
        f = _Fields(d, "generation_config.json")
        eos = d.get("eos_token_id")
        eos_ids = (f.integer("eos_token_id"),) if isinstance(eos, int) and not isinstance(eos, bool) else f.ints("eos_token_id")
        return cls(
            eos_token_ids=tuple(eos_ids),
            bos_token_id=f.integer("bos_token_id", None),
            pad_token_id=f.integer("pad_token_id", None),
            sampling={row.name: f.sampling_field(row) for row in MODEL_DEFAULTS if d.get(row.name) is not None},
            do_sample=f.boolean("do_sample", None),
        )


def _flatten_vision_config(d: dict[str, Any], f: "_Fields") -> tuple[dict[str, Any], dict[str, Any]]:
    """A VL config.json as a text model's dict (the `text_config` keys over the top-level ones, the
    rotary type "mrope" read as "default" with its sections apart) and the vision fields."""
    text = f.mapping("text_config") or {}
    # The text keys over the top-level ones, but for tie_word_embeddings, which transformers reads
    # from the top (a Qwen3-VL-MoE text_config may say true beside an untied top level and lm_head).
    merged = {**d, **{k: v for k, v in text.items() if k != "model_type"}}
    if "tie_word_embeddings" in d:
        merged["tie_word_embeddings"] = d["tie_word_embeddings"]
    merged.pop("text_config", None)
    fields = _Fields(merged, "config.json")
    vision_config = f.mapping("vision_config")
    if not vision_config:
        raise ModelLoadError(f"config.json: a {d.get('model_type')} checkpoint needs a vision_config object")
    sections: list[int] = []
    interleaved = False
    for key in ("rope_parameters", "rope_scaling"):
        rope = fields.mapping(key)
        if rope:
            rope = dict(rope)
            sections = _Fields(rope, f"config.json {key}").ints("mrope_section") or sections
            interleaved = _Fields(rope, f"config.json {key}").boolean("mrope_interleaved", interleaved)
            rope.pop("mrope_section", None)
            rope.pop("mrope_interleaved", None)
            if rope.get("type") == "mrope":
                rope["type"] = "default"
            if rope.get("rope_type") == "mrope":
                rope["rope_type"] = "default"
            merged[key] = rope
    if not sections:
        raise ModelLoadError("config.json: rope_scaling.mrope_section (the M-RoPE sections) is missing")
    head_dim = fields.positive_integer("head_dim", fields.positive_integer("hidden_size")
                                       // fields.positive_integer("num_attention_heads"))
    if len(sections) != 3 or sum(sections) * 2 != head_dim or min(sections) < 1:
        raise ModelLoadError(f"config.json: mrope_section {sections} must be positive and sum to head_dim / 2 ({head_dim // 2})")
    return merged, dict(
        vision_config=vision_config,
        image_token_id=fields.integer("image_token_id"),
        video_token_id=fields.integer("video_token_id", None),
        vision_start_token_id=fields.integer("vision_start_token_id"),
        mrope_section=tuple(sections),
        mrope_interleaved=interleaved,
    )


def read_json(path: str | Path) -> dict[str, Any]:
    """Parse a JSON file that holds an object, turning failures into ModelLoadError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {_type_name(value)}")
    return value


_MISSING = object()


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class _Fields:
    """Typed reads of one config file's keys: a value of the wrong type is a ModelLoadError
    naming the file and the key, never a number parsed from a string or a traceback."""

    def __init__(self, d: dict[str, Any], source: str):
        self.d = d
        self.source = source

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], what: str) -> Any:
        value = self.d.get(key, _MISSING)
        if value is _MISSING or (value is None and default is not _MISSING):
            if default is _MISSING:
                raise ModelLoadError(f"{self.source} is missing the key {key!r}")
            return default
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise ModelLoadError(f"{self.source}: {key} must be {what}, got {_type_name(value)} ({_short(value)})")
        return value

    def integer(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, default, (int,), "an integer")

    def positive_integer(self, key: str, default: Any = _MISSING) -> Any:
        value = self.integer(key, default)
        if value is not None and value < 1:
            raise ModelLoadError(f"{self.source}: {key} must be at least 1, got {value}")
        return value

    def number(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default, (int, float), "a number")
        return None if value is None else float(value)

    def positive_number(self, key: str, default: Any = _MISSING) -> Any:
        value = self.number(key, default)
        if value is not None and not value > 0:
            raise ModelLoadError(f"{self.source}: {key} must be > 0, got {value}")
        return value

    def sampling_field(self, row: SamplingField) -> Any:
        try:
            return row.check(self.d[row.name])
        except ValueError as e:
            raise ModelLoadError(f"{self.source}: {e}") from None

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, default, (bool,), "true or false")

    def string(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, default, (str,), "a string")

    def mapping(self, key: str) -> dict[str, Any] | None:
        return self._get(key, None, (dict,), "an object")

    def strings(self, key: str) -> list[str]:
        values = self._get(key, [], (list,), "an array of strings")
        if not all(isinstance(v, str) for v in values):
            raise ModelLoadError(f"{self.source}: {key} must be an array of strings, got {_short(values)}")
        return values

    def ints(self, key: str) -> list[int]:
        values = self._get(key, [], (list,), "an array of integers")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ModelLoadError(f"{self.source}: {key} must be an array of integers, got {_short(values)}")
        return values


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
