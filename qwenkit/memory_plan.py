"""What a model will need in memory, from its headers, before any weight is read.

Three parts, each as the engine sizes it (qwenkit/engine/llm_engine.py):

* weights: every stored tensor as it is held after loading with the default
  ``quantization="auto"``: quantized data as stored (GGUF blocks, FP8 bytes, AWQ / GPTQ /
  compressed-tensors packed int4 / int8 words, their scales and zeros), float tensors (the
  embeddings, norms, a float checkpoint's matrices) in the compute dtype. Read from the
  safetensors headers or the GGUF tensor table: exact counts, no weights read.
* KV cache: 2 x layers x KV heads x head_dim x the KV dtype a token, for the engine's pool:
  on the CPU the default 2 GiB (QWENKIT_KV_CACHE_MEMORY, --kv-cache-memory), never more than
  max_num_seqs full contexts; on CUDA the engine takes what is free, so the plan counts the
  least that serves one full context.
* activations: a step's widest intermediate for max_num_batched_tokens tokens, twice, and
  the logits with the sampler's copies (the estimate the engine subtracts on CUDA), plus
  512 MiB on CUDA for its context and workspaces.

With tensor parallelism the weights and the KV cache are split over the ranks (the
embeddings and norms are replicated; counted split: the figure is per rank, a little low).

The check compares the total with what the device has free: MemAvailable (and a cgroup's
memory limit) on the CPU, ``torch.cuda.mem_get_info`` on CUDA. A model that does not fit is
refused with one line naming a published variant that would (docs/models.md#memory);
``--no-memory-check`` or ``QWENKIT_NO_MEMORY_CHECK=1`` loads anyway.

No torch at import: `qwenkit show`, `list` and `pull` plan without the engine.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenkit.errors import QwenkitError

GIB = 1 << 30
DEFAULT_KV_CACHE_MEMORY = 2 << 30  # the engine's CPU default
_CUDA_OVERHEAD = 512 << 20
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
_STORED_DTYPES = {"I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                  "F8_E4M3": 1, "F8_E5M2": 1}
# Float tensors a quantized layer carries beside its data: held as stored.
_QUANT_AUX = ("scales", "scale", "scale_inv", "weight_scale", "weight_scale_inv", "input_scale", "qzeros",
              "zeros", "g_idx", "weight_zero_point", "weight_g_idx", "weight_shape")
NO_CHECK_ENV = "QWENKIT_NO_MEMORY_CHECK"


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache, the activations and a variant's weights depend on."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # a dense MLP's; 0 for an MoE with no dense layers
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    vocab_size: int
    context_length: int
    tie_word_embeddings: bool

    @property
    def num_parameters(self) -> int:
        """The logical weights (as floats), whatever the format stores."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = h * q * 2 + h * kv * 2
        if self.num_experts:
            mlp = self.num_experts * 3 * h * self.moe_intermediate_size + self.num_experts * h
        else:
            mlp = 3 * h * self.intermediate_size
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attention + mlp) + embeddings

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a model needs on `device`, per rank."""

    weights: int
    kv_cache: int
    activations: int
    kv_tokens: int
    device: str
    dtype: str
    tensor_parallel_size: int = 1

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def summary(self) -> str:
        """'9.1 GiB (weights 8.2, KV cache 0.6 for 4,096 tokens, activations 0.3)'."""
        return (f"{gib(self.total)} (weights {self.weights / GIB:.1f}, KV cache {self.kv_cache / GIB:.1f} for "
                f"{self.kv_tokens:,} tokens, activations {self.activations / GIB:.1f})")


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


# -- reading the headers --------------------------------------------------------------------


def read_shape(files: Any) -> ModelShape:
    """The shape of a `ModelFiles`' model, from config.json or the GGUF metadata."""
    if files.format == "gguf":
        from qwenkit.gguf_header import read_header

        metadata, _ = read_header(Path(files.path))
        return gguf_shape(metadata)
    return config_shape(json.loads((Path(files.path) / "config.json").read_text(encoding="utf-8")))


def config_shape(config: dict[str, Any]) -> ModelShape:
    c = config.get("text_config", config)
    heads = int(c["num_attention_heads"])
    return ModelShape(
        num_layers=int(c["num_hidden_layers"]), hidden_size=int(c["hidden_size"]), num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
        intermediate_size=int(c.get("intermediate_size") or 0) if not c.get("num_experts") else 0,
        moe_intermediate_size=int(c.get("moe_intermediate_size") or 0), num_experts=int(c.get("num_experts") or 0),
        num_experts_per_tok=int(c.get("num_experts_per_tok") or 0), vocab_size=int(c["vocab_size"]),
        context_length=int(c.get("max_position_embeddings") or 0),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
    )


def gguf_shape(metadata: dict[str, Any]) -> ModelShape:
    arch = metadata.get("general.architecture", "qwen2")

    def get(key: str, default: Any = 0) -> Any:
        return metadata.get(f"{arch}.{key}", default)

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    experts = int(get("expert_count"))
    vocab = len(metadata.get("tokenizer.ggml.tokens") or []) or int(get("vocab_size"))
    return ModelShape(
        num_layers=int(get("block_count")), hidden_size=hidden, num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", hidden // heads)),
        intermediate_size=0 if experts else int(get("feed_forward_length")),
        moe_intermediate_size=int(get("expert_feed_forward_length")), num_experts=experts,
        num_experts_per_tok=int(get("expert_used_count")), vocab_size=vocab,
        context_length=int(get("context_length")), tie_word_embeddings=False,
    )


def weight_bytes(files: Any, dtype: str) -> int:
    """Bytes the weights take once loaded (quantization "auto") in compute `dtype`."""
    itemsize = ITEMSIZE[dtype]
    if files.format == "gguf":
        from gguf import GGMLQuantizationType

        from qwenkit.gguf_header import read_header

        floats = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
        _, tensors = read_header(Path(files.path))
        return sum(math.prod(t.shape) * itemsize if t.tensor_type in floats else t.num_bytes
                   for t in tensors.values())
    total = 0
    for path in sorted(Path(files.path).glob("*.safetensors")):
        for name, entry in safetensors_header(path).items():
            if name == "__metadata__":
                continue
            total += held_bytes(name, entry["dtype"], math.prod(entry["shape"]),
                                entry["data_offsets"][1] - entry["data_offsets"][0], itemsize)
    return total


def held_bytes(name: str, stored_dtype: str, count: int, stored: int, itemsize: int) -> int:
    """Bytes a safetensors tensor takes loaded: a float one (not a quantized layer's scale or
    zero) in the compute dtype (`itemsize`), anything else as stored."""
    if stored_dtype in _FLOAT_DTYPES and not name.endswith(_QUANT_AUX):
        return count * itemsize
    return stored


def safetensors_header(path: Path) -> dict[str, Any]:
    # The format: an 8-byte little-endian length, then that many bytes of JSON.
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


# -- the plan -------------------------------------------------------------------------------


def default_dtype(device: str) -> str:
    """The compute dtype `LLM` picks unset (qwenkit.llm.resolve_dtype), read without torch."""
    if device.startswith("cuda"):
        return "bfloat16"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return "float32"
    return "bfloat16" if {"amx_bf16", "avx512_bf16"} & set(flags) else "float32"


def plan_memory(shape: ModelShape, weights: int, *, device: str = "cpu", dtype: str | None = None,
                kv_cache_dtype: str | None = None, kv_cache_memory: int | None = None,
                max_model_len: int | None = None, max_num_seqs: int | None = None,
                max_num_batched_tokens: int | None = None, tensor_parallel_size: int = 1) -> MemoryPlan:
    """The plan for a model of `shape` whose weights take `weights` bytes, with the engine's
    defaults for `device` ("cpu" or "cuda") where an argument is None."""
    cuda = device.startswith("cuda")
    dtype = dtype or default_dtype(device)
    itemsize = ITEMSIZE[dtype]
    if kv_cache_dtype in (None, "auto"):
        kv_cache_dtype = "float16" if not cuda and dtype == "float32" else dtype
    tp = max(1, tensor_parallel_size)
    context = min(max_model_len or shape.context_length, shape.context_length) or (max_model_len or 4096)
    seqs = max_num_seqs or (256 if cuda else 32)
    batched = max_num_batched_tokens or (8192 if cuda else 512)
    per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * ITEMSIZE[kv_cache_dtype] // tp
    if cuda:
        kv_tokens = context  # the pool takes what is free; one full context is the least that serves
    else:
        pool = kv_cache_memory or parse_memory(os.environ.get("QWENKIT_KV_CACHE_MEMORY")) or DEFAULT_KV_CACHE_MEMORY
        kv_tokens = min(pool // per_token, seqs * context)
    width = 4 * shape.hidden_size + 4 * max(shape.intermediate_size,
                                            shape.moe_intermediate_size * shape.num_experts_per_tok)
    activations = batched * width * itemsize * 2 + seqs * shape.vocab_size * 4 * 4 + (_CUDA_OVERHEAD if cuda else 0)
    return MemoryPlan(weights=weights // tp, kv_cache=kv_tokens * per_token, activations=activations,
                      kv_tokens=kv_tokens, device="cuda" if cuda else "cpu", dtype=dtype, tensor_parallel_size=tp)


def plan_files(files: Any, **options: Any) -> MemoryPlan:
    """`plan_memory` for a `ModelFiles`, read from its headers; QwenkitError when they lack
    what the plan needs (a header that is not a model's)."""
    device = options.get("device") or "cpu"
    dtype = options.get("dtype") or default_dtype(device)
    try:
        shape, weights = read_shape(files), weight_bytes(files, dtype)
    except (KeyError, ValueError, TypeError, AttributeError, ZeroDivisionError) as e:
        raise QwenkitError(f"cannot plan the memory of {files.name}: its header lacks {e}") from None
    return plan_memory(shape, weights, **{**options, "device": device, "dtype": dtype})


def parse_memory(text: str | int | None) -> int | None:
    """'4GiB', '512MB', '2e9' -> bytes (None for None)."""
    if text is None or isinstance(text, int):
        return text
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    value = text.strip().lower()
    for unit, factor in units.items():
        if value.endswith(unit):
            return int(float(value[: -len(unit)]) * factor)
    return int(float(value))


# -- what the machine has ---------------------------------------------------------------------


def available_memory(device: str = "cpu") -> int:
    """Bytes free for a model: on CUDA the card's free memory, on the CPU MemAvailable,
    lowered to what a cgroup's memory limit leaves."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, available)


# -- variants that would fit ------------------------------------------------------------------

# Bits a weight, for a published variant's matrices; embeddings as the variant keeps them.
_VARIANT_BITS = {"q8_0": 8.5, "q6_k": 6.56, "q5_k_m": 5.69, "q4_k_m": 4.85, "q4_0": 4.5}


def variant_needs(name: str, shape: ModelShape, plan: MemoryPlan) -> list[tuple[str, int]]:
    """(short name, bytes) for the published variants of the model `name` (a short name or
    repo id) with the KV cache and activations of `plan`, largest first; [] if unknown."""
    from qwenkit.model_names import QUANTIZED_REPOS, QWEN_MODELS, short_name_of

    base = _base_name(name) or _base_name(short_name_of(name) or "")
    if base is None:
        return []
    params, embeddings = shape.num_parameters, shape.embedding_parameters
    rest = plan.kv_cache + plan.activations
    needs = [(base, params * ITEMSIZE[plan.dtype])]
    if f"{base}-fp8" in QUANTIZED_REPOS:
        needs.append((f"{base}-fp8", (params - embeddings) + embeddings * ITEMSIZE[plan.dtype]))
    if f"{base}-awq" in QUANTIZED_REPOS:  # 4 bits, a float16 scale and a 4-bit zero a group of 128
        needs.append((f"{base}-awq", int((params - embeddings) * (4 + 20 / 128) / 8) + embeddings * 2))
    if QWEN_MODELS[base][1] is not None:
        needs += [(f"{base}-{q}", int(params * bits / 8)) for q, bits in _VARIANT_BITS.items()]
    return sorted(((n, b // plan.tensor_parallel_size + rest) for n, b in needs), key=lambda x: -x[1])


def _base_name(name: str) -> str | None:
    from qwenkit.model_names import QUANTIZATIONS, QWEN_MODELS

    name = name.lower()
    if name in QWEN_MODELS:
        return name
    base, _, suffix = name.rpartition("-")
    if base in QWEN_MODELS and (suffix in QUANTIZATIONS or suffix in ("fp8", "awq")):
        return base
    return None


def check_fits(files: Any, plan: MemoryPlan, available: int, *, name: str | None = None) -> None:
    """Raise QwenkitError (one line) when `plan` needs more than `available` bytes, naming
    the largest published variant that fits, if one is known."""
    if plan.total <= available:
        return
    where = "the GPU" if plan.device == "cuda" else "this machine"
    line = f"{name or files.name} needs {plan.summary()}, {where} has {gib(available)} free"
    own = (name or files.name).lower()
    fitting = [(n, b) for n, b in variant_needs(own, read_shape(files), plan) if b <= available and n != own]
    if fitting:
        line += f"; {fitting[0][0]} needs {gib(fitting[0][1])}"
    raise QwenkitError(line + f" (--no-memory-check or {NO_CHECK_ENV}=1 loads anyway)")
