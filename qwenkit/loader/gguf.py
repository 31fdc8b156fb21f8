"""Reading a GGUF checkpoint of a Qwen2 / Qwen3 / Qwen3-MoE model.

:class:`GGUFCheckpoint` turns the file's metadata into the dicts a Hugging Face checkpoint
ships (`config.json`, `generation_config.json`), its vocabulary into a `tokenizers.Tokenizer`,
and its tensors into `(hf_name, tensor)` pairs, dequantized one at a time with
`gguf.quants.dequantize` (or, for a quantizing load, read lazily as `GGUFTensor`s).

The header (metadata and tensor table) is read by :mod:`qwenkit.gguf_header`, which
`qwenkit list` and `show` also use without loading torch.

No q/k un-permutation is needed. llama.cpp's `convert_hf_to_gguf.py` permutes q_proj/k_proj
rows only in `LlamaModel.modify_tensors` (and in other classes that call
`LlamaModel.permute`), for models whose rope rotates adjacent pairs. `Qwen2Model`,
`Qwen3Model(Qwen2Model)` and `Qwen3MoeModel(Qwen2MoeModel)` derive from `TextModel` and only
rename tensors, since Qwen's NEOX-style rope rotates the two halves of a head as Hugging Face
does; transformers' GGUF loader likewise un-permutes for llama only.
"""

from __future__ import annotations

import math
import mmap
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from qwenkit import kernels
from qwenkit.errors import ModelLoadError
from qwenkit.gguf_header import TensorInfo as _TensorInfo
from qwenkit.gguf_header import read_header as _read_header

if TYPE_CHECKING:
    import tokenizers

# general.architecture -> (Hugging Face model_type, architectures entry)
_ARCHITECTURES = {
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}

SUPPORTED_TENSOR_TYPES = frozenset(
    {
        GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q5_0,
        GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K,
    }
)

# GGUF tensor name -> Hugging Face name. Per-layer names are `blk.N.<key>.{weight,bias}`.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
}
# All experts of a layer in one 3-D tensor, [num_experts, out, in]; named like transformers
# v5's fused expert parameters, which carry no `.weight` suffix.
_EXPERT_NAMES = {
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# The split Qwen2's tokenizer.json applies before byte-level BPE (also Qwen2.5 and Qwen3).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre values whose vocabulary splits text with QWEN2_PATTERN.
_QWEN2_PRE_TOKENIZERS = ("qwen2", "deepseek-r1-qwen")

# special_tokens() key -> tokenizer.ggml.* key holding its id.
_SPECIAL_TOKEN_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "padding_token_id"}
# llama.cpp token types (tokenizer.ggml.token_type).
_TOKEN_CONTROL = 3
MADV_POPULATE_READ = 22  # <linux/mman.h>, Linux 5.14; not in Python's mmap module before 3.13
_TOKEN_USER_DEFINED = 4

class GGUFCheckpoint:
    """A Qwen-family GGUF file: its config, tokenizer and dequantized weights in HF names."""

    def __init__(self, path: str | os.PathLike):
        """Read the file's metadata and tensor table; tensor data is read by `iter_weights`.

        Raises ModelLoadError if the file is missing, not a GGUF, truncated, or not a
        Qwen2 / Qwen3 / Qwen3-MoE model.
        """
        self.path = Path(path)
        self._metadata, self._tensors = _read_header(self.path)
        architecture = self._metadata.get("general.architecture")
        if architecture not in _ARCHITECTURES:
            raise ModelLoadError(
                f"{self.path}: unsupported architecture {architecture!r}; qwenkit reads GGUF files of "
                + ", ".join(_ARCHITECTURES)
            )
        self._architecture = architecture
        self._hf_names = {}
        for info in self._tensors.values():
            if info.tensor_type not in SUPPORTED_TENSOR_TYPES:
                supported = ", ".join(t.name for t in sorted(SUPPORTED_TENSOR_TYPES))
                raise ModelLoadError(
                    f"{self.path}: tensor {info.name} is stored as {info.tensor_type.name}, "
                    f"which qwenkit cannot dequantize (supported: {supported})"
                )
            self._hf_names[info.name] = _hf_name(info.name, self.path)
        self._token_ids: dict[str, int] | None = None

    # -- config ----------------------------------------------------------------------------

    def _arch_key(self, key: str, default: Any = None) -> Any:
        return self._metadata.get(f"{self._architecture}.{key}", default)

    def _required(self, key: str) -> Any:
        value = self._arch_key(key)
        if value is None:
            raise ModelLoadError(f"{self.path}: metadata key {self._architecture}.{key} is missing")
        return value

    def hf_config(self) -> dict[str, Any]:
        """The `config.json` Hugging Face would write for this model."""
        model_type, architecture_name = _ARCHITECTURES[self._architecture]
        hidden_size = int(self._required("embedding_length"))
        num_heads = int(self._required("attention.head_count"))
        config: dict[str, Any] = {
            "model_type": model_type,
            "architectures": [architecture_name],
            "vocab_size": self._vocab_size(),
            "hidden_size": hidden_size,
            "num_hidden_layers": int(self._required("block_count")),
            "num_attention_heads": num_heads,
            "num_key_value_heads": int(self._arch_key("attention.head_count_kv", num_heads)),
            "head_dim": int(self._arch_key("attention.key_length", hidden_size // num_heads)),
            "max_position_embeddings": int(self._required("context_length")),
            "rms_norm_eps": float(self._required("attention.layer_norm_rms_epsilon")),
            # llama.cpp's default when a file states no base.
            "rope_theta": float(self._arch_key("rope.freq_base", 10000.0)),
            "hidden_act": "silu",
            "attention_bias": "blk.0.attn_q.bias" in self._tensors,
            "tie_word_embeddings": "output.weight" not in self._tensors,
        }
        rope_scaling = self._rope_scaling()
        if rope_scaling is not None:
            config["rope_scaling"] = rope_scaling
        if model_type == "qwen3_moe":
            moe_intermediate_size = int(self._required("expert_feed_forward_length"))
            config.update(
                intermediate_size=int(self._arch_key("feed_forward_length", moe_intermediate_size)),
                num_experts=int(self._required("expert_count")),
                num_experts_per_tok=int(self._required("expert_used_count")),
                moe_intermediate_size=moe_intermediate_size,
                # llama.cpp always renormalizes the top-k weights of qwen3moe.
                norm_topk_prob=bool(self._arch_key("expert_weights_norm", True)),
                decoder_sparse_step=1,
                mlp_only_layers=[],
            )
        else:
            config["intermediate_size"] = int(self._required("feed_forward_length"))
        for key in ("bos_token_id", "eos_token_id"):
            token_id = self._metadata.get(f"tokenizer.ggml.{key}")
            if token_id is not None:
                config[key] = int(token_id)
        return config

    # llama.cpp's enum llama_pooling_type (gguf.PoolingType), by the value `{arch}.pooling_type` holds.
    POOLING_TYPES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}

    def pooling(self) -> str | None:
        """How the file says its hidden states are pooled: "last" for llama.cpp's conversions of
        Qwen3-Embedding (the mark of an embedding model, whose tied weights otherwise look like a
        chat model's), another name of POOLING_TYPES, or None where the file says nothing."""
        value = self._arch_key("pooling_type")
        if value is None:
            return None
        if int(value) not in self.POOLING_TYPES:
            raise ModelLoadError(f"{self.path}: unknown {self._architecture}.pooling_type {value}")
        return self.POOLING_TYPES[int(value)]

    def _vocab_size(self) -> int:
        # The embedding rows are what the weights need; llama.cpp pads the token list to match.
        if "token_embd.weight" in self._tensors:
            return self._tensors["token_embd.weight"].shape[0]
        tokens = self._metadata.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelLoadError(f"{self.path}: has neither token_embd.weight nor tokenizer.ggml.tokens")
        return len(tokens)

    def _rope_scaling(self) -> dict[str, Any] | None:
        rope_type = self._arch_key("rope.scaling.type")
        if rope_type in (None, "none"):
            return None
        scaling: dict[str, Any] = {"rope_type": rope_type, "factor": float(self._arch_key("rope.scaling.factor", 1.0))}
        original = self._arch_key("rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling

    def generation_config(self) -> dict[str, Any]:
        """The `generation_config.json` for this model: every end-of-turn id, eos first."""
        eos_ids: list[int] = []
        eos = self._metadata.get("tokenizer.ggml.eos_token_id")
        if eos is not None:
            eos_ids.append(int(eos))
        for text in ("<|im_end|>", "<|endoftext|>"):
            token_id = self._token_id(text)
            if token_id is not None and token_id not in eos_ids:
                eos_ids.append(token_id)
        config: dict[str, Any] = {"eos_token_id": eos_ids}
        for key, gguf_key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
            token_id = self._metadata.get(f"tokenizer.ggml.{gguf_key}")
            if token_id is not None:
                config[key] = int(token_id)
        return config

    # -- tokenizer -------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template stored in the file, if any."""
        return self._metadata.get("tokenizer.chat_template")

    def _token_id(self, text: str) -> int | None:
        if self._token_ids is None:
            tokens = self._metadata.get("tokenizer.ggml.tokens") or []
            self._token_ids = {token: index for index, token in enumerate(tokens)}
        return self._token_ids.get(text)

    def special_tokens(self) -> dict[str, str | None]:
        """The texts of the bos, eos and pad tokens the metadata names (None where absent)."""
        tokens = self._metadata.get("tokenizer.ggml.tokens") or []
        result: dict[str, str | None] = {}
        for name, gguf_key in _SPECIAL_TOKEN_KEYS.items():
            token_id = self._metadata.get(f"tokenizer.ggml.{gguf_key}")
            result[name] = tokens[token_id] if token_id is not None and token_id < len(tokens) else None
        return result

    def tokenizer_backend(self) -> "tokenizers.Tokenizer":
        """The byte-level BPE tokenizer Qwen's `tokenizer.json` describes, rebuilt from metadata."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        model = self._metadata.get("tokenizer.ggml.model")
        pre = self._metadata.get("tokenizer.ggml.pre")
        if model != "gpt2" or pre not in _QWEN2_PRE_TOKENIZERS:
            raise ModelLoadError(
                f"{self.path}: unsupported tokenizer (tokenizer.ggml.model={model!r}, tokenizer.ggml.pre={pre!r}); "
                "qwenkit builds the Qwen2 byte-level BPE tokenizer (model 'gpt2', pre 'qwen2')"
            )
        tokens = self._metadata.get("tokenizer.ggml.tokens")
        merges = self._metadata.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise ModelLoadError(f"{self.path}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
        token_types = self._metadata.get("tokenizer.ggml.token_type") or [0] * len(tokens)

        vocab = {token: index for index, token in enumerate(tokens)}
        backend = Tokenizer(
            BPE(
                vocab=vocab,
                merges=[tuple(merge.split(" ", 1)) for merge in merges],
                unk_token=None,
                byte_fallback=False,
                fuse_unk=False,
                continuing_subword_prefix="",
                end_of_word_suffix="",
            )
        )
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(
            [
                AddedToken(token, special=True, normalized=False)
                for token, token_type in zip(tokens, token_types)
                if token_type == _TOKEN_CONTROL
            ]
        )
        backend.add_tokens(
            [
                AddedToken(token, special=False, normalized=False)
                for token, token_type in zip(tokens, token_types)
                if token_type == _TOKEN_USER_DEFINED
            ]
        )
        return backend

    # -- weights ---------------------------------------------------------------------------

    def tensor_types(self) -> dict[str, GGMLQuantizationType]:
        """How each tensor is stored, by Hugging Face name."""
        return {self._hf_names[info.name]: info.tensor_type for info in self._tensors.values()}

    def iter_weights(
        self, dtype: torch.dtype = torch.float32, *, lazy: bool = False
    ) -> Iterator[tuple[str, torch.Tensor | GGUFTensor]]:
        """Every tensor as `(hf_name, tensor)` in HF shapes, dequantized one at a time to
        `dtype`; with `lazy`, as a `GGUFTensor` that reads its rows when asked. The iterator
        holds no reference to the checkpoint's metadata (~30 MB of vocabulary strings)."""
        tensors = [(self._hf_names[info.name], GGUFTensor(self.path, info)) for info in self._tensors.values()]
        return ((name, t if lazy else t.read_rows(0, t.shape[0]).to(dtype)) for name, t in tensors)


class GGUFTensor:
    """One tensor of a GGUF file, read on demand a block of rows (dim 0) at a time, so that a
    quantizing loader never holds a whole float copy. Reads go through the file, not a
    memory map, so loaded bytes do not stay in the process's resident memory."""

    def __init__(self, path: Path, info: _TensorInfo):
        self.path = path
        self.info = info
        self.shape = info.shape
        self.ggml_type = info.tensor_type
        self._row_bytes = info.num_bytes // info.shape[0] if info.shape else info.num_bytes

    @property
    def stores_int4(self) -> bool:
        """Q4_K: 4-bit values in groups of 32 with a scale and a min, as torch's int4 kernel takes."""
        return self.ggml_type == GGMLQuantizationType.Q4_K and len(self.shape) == 2

    def read_raw(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as stored: uint8 [rows, bytes per row]."""
        raw = np.fromfile(self.path, dtype=np.uint8, count=(stop - start) * self._row_bytes,
                          offset=self.info.start + start * self._row_bytes)
        return torch.from_numpy(raw.reshape(stop - start, self._row_bytes))

    def map_raw(self, *, populate: bool = False) -> torch.Tensor:
        """All rows as stored, uint8 [rows, bytes per row], as a view of the file rather than
        a copy: a private (copy-on-write) memory map, so only the pages a reader touches
        become resident. For a tensor read a few rows at a time (the token embedding).

        populate: every page mapped now (MADV_POPULATE_READ), as a load that reads the tensor would:
        for a tensor each step reads parts of that are unknown ahead (an MoE layer's experts).
        Mapped lazily, each step's first touch of an expert's pages faults them in one by one
        (~0.45 us a 4 KiB page here: ~2.6 ms per cold layer of Qwen3-30B-A3B at one token, more
        than its ~1.6 ms of arithmetic)."""
        if not populate:
            mapped = np.memmap(self.path, dtype=np.uint8, mode="c", offset=self.info.start,
                               shape=(self.shape[0], self._row_bytes))
            return torch.from_numpy(mapped)
        skip = self.info.start % mmap.ALLOCATIONGRANULARITY  # the map starts at a multiple of it
        with open(self.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), skip + self.info.num_bytes, flags=mmap.MAP_PRIVATE,
                               offset=self.info.start - skip)
        # Read faults, so the pages stay the file's: MAP_POPULATE on a private writable map takes
        # write faults, a private copy of every page (anonymous memory the size of the tensor).
        try:
            mapped.madvise(MADV_POPULATE_READ)
        except OSError:  # Linux before 5.14: read ahead instead
            mapped.madvise(mmap.MADV_WILLNEED)
        raw = torch.frombuffer(mapped, dtype=torch.uint8, count=self.info.num_bytes, offset=skip)
        return raw.view(self.shape[0], self._row_bytes)

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) dequantized to float32."""
        raw = self.read_raw(start, stop).numpy()
        shape = (stop - start, *self.shape[1:])
        if self.ggml_type == GGMLQuantizationType.F32:
            values = raw.view(np.float32)
        elif self.ggml_type == GGMLQuantizationType.F16:
            values = raw.view(np.float16).astype(np.float32)
        elif ((name := self.ggml_type.name) in kernels.DEQUANTIZED_BLOCKS
              and math.prod(shape[:-1]) % kernels.PACKED_ROWS.get(name, 1) == 0):  # packed: whole panels only
            # Through the C kernels' dequantization where they are built (bit for bit gguf's, tested;
            # gguf's own code where not), 6-10x faster than gguf's numpy code: the K-quants are most
            # of a K-quant model's load under "auto", the Q8_0 output matrix was a third of the
            # default model's, its Q5_0 parts of matrices that become int8 a tenth.
            rows = torch.from_numpy(raw.reshape(math.prod(shape[:-1]), -1))
            if name in kernels.GGUF_BLOCKS:
                rows = kernels.gguf_pack(rows, shape[-1], name)  # the kernels' layout (Q5_0 interleaved)
            return kernels.gguf_dequantize(rows, shape[-1], name).reshape(shape)
        else:
            # gguf.quants wants rows of blocks: [..., bytes per row].
            values = dequantize(raw.reshape(math.prod(shape[:-1]), -1), self.ggml_type)
        return torch.from_numpy(values).reshape(shape)

    def read_int4(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q4_K rows [start, stop) as (q uint8 [rows, K], scale, min float32 [rows, K / 32]):
        w = q * scale + min, exactly as `gguf.quants` dequantizes them."""
        from gguf.quants import Q4_K

        rows, k = stop - start, self.shape[1]
        blocks = self.read_raw(start, stop).numpy().reshape(-1, GGML_QUANT_SIZES[self.ggml_type][1])
        d = blocks[:, 0:2].view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].view(np.float16).astype(np.float32)
        sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
        # 32 bytes hold two groups of 32: the low nibbles, then the high ones.
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & np.uint8(0x0F)).reshape(rows, k)
        scale = (d * sc.astype(np.float32)).reshape(rows, k // 32)
        low = -(dmin * m.astype(np.float32)).reshape(rows, k // 32)
        return torch.from_numpy(q), torch.from_numpy(scale), torch.from_numpy(low)


def _hf_name(gguf_name: str, path: Path) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and suffix == "weight":
        return f"{_GLOBAL_NAMES[base]}.weight"
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is not None:
        layer, key, suffix = match.groups()
        if key in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[key]}.{suffix}"
        if key in _EXPERT_NAMES and suffix == "weight":
            return f"model.layers.{layer}.{_EXPERT_NAMES[key]}"
    raise ModelLoadError(f"{path}: tensor {gguf_name!r} has no Hugging Face counterpart qwenkit knows")
