"""Load a checkpoint (Hugging Face folder or GGUF file) into a ready model and tokenizer."""

from __future__ import annotations

import logging
import sys
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from qwenkit.config import GenerationConfig, ModelConfig, read_json
from qwenkit.errors import ModelLoadError
from qwenkit.loader.quantization import check_quantization, plan_quantization
from qwenkit.loader.weights import load_weights
from qwenkit.model_files import ModelFiles
from qwenkit.models import MODEL_REGISTRY, QwenForCausalLM
from qwenkit.models.quant import quantize_modules
from qwenkit.tokenizer import Tokenizer

if TYPE_CHECKING:
    from qwenkit.distributed import TensorParallel

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: QwenForCausalLM
    config: ModelConfig
    generation_config: GenerationConfig
    tokenizer: Tokenizer
    name: str
    # What a GGUF file's `{arch}.pooling_type` says ("last": an embedding model); None for a folder
    # (qwenkit.capabilities reads its sentence-transformers config) or a file that says nothing.
    pooling: str | None = None


def load_model(
    files: ModelFiles,
    *,
    dtype: torch.dtype,
    device: torch.device,
    quantization: str | None = "auto",
    progress: bool = True,
    tp: "TensorParallel | None" = None,
) -> LoadedModel:
    """Build the model for `files`, fill its weights and load its tokenizer.

    quantization: "auto" (on CPU, GGUF weights stay quantized; safetensors load as `dtype`),
    "gguf" (as auto, with the K-quants kept as stored too), "none" (everything as `dtype`),
    "int8" or "int4" (weight-only quantized as they load).
    See qwenkit/loader/quantization.py and docs/quantization.md. tp: this process's rank of
    a tensor-parallel group; the model is built with its shards only (float weights).
    """
    quantization = check_quantization(quantization)
    prequantized = pooling = None
    if files.format == "gguf":
        from qwenkit.loader.gguf import GGUFCheckpoint

        ckpt = GGUFCheckpoint(files.path)
        config = ModelConfig.from_hf(ckpt.hf_config())
        generation_config = GenerationConfig.from_hf(ckpt.generation_config())
        tokenizer = Tokenizer(ckpt.tokenizer_backend(), chat_template=ckpt.chat_template, **ckpt.special_tokens())
        tensor_types = ckpt.tensor_types()
        total = len(tensor_types)
        pooling = ckpt.pooling()
    else:
        from qwenkit.loader.prequantized import read_prequantization
        from qwenkit.loader.safetensors import count_tensors, iter_safetensors, stored_tensors

        config = ModelConfig.from_file(files.path / "config.json")
        gen_path = files.path / "generation_config.json"
        generation_config = GenerationConfig.from_hf(read_json(gen_path) if gen_path.exists() else {})
        tokenizer = Tokenizer.from_dir(files.path)
        tensor_types = None
        total = count_tensors(files.path)
        scheme = read_prequantization(config.quantization_config)
        if scheme is not None:
            prequantized = scheme, stored_tensors(files.path)
    if not generation_config.eos_token_ids and tokenizer.eos_token_id is not None:
        generation_config = GenerationConfig(eos_token_ids=(tokenizer.eos_token_id,))
    if config.vocab_size < tokenizer.vocab_size:
        raise ModelLoadError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {config.vocab_size}"
        )
    if tp is not None and tp.size > 1:
        from qwenkit.distributed.tensor_parallel import build_sharded

        if prequantized is not None:
            raise ModelLoadError("pre-quantized checkpoints are not supported with tensor parallelism yet")
        if config.is_vision:
            raise ModelLoadError("vision-language models are not supported with tensor parallelism yet")
        if quantization not in ("auto", "none"):
            raise ModelLoadError(f"--quantization {quantization} is not supported with tensor parallelism yet")
        model, formats = build_sharded(MODEL_REGISTRY[config.model_type], config, dtype=dtype, device=device, tp=tp), {}
    else:
        # A pre-quantized model is built on the CPU and moved once its matrices are swapped: built on
        # a GPU, its float matrices would take their memory there before the swap.
        build_device = torch.device("cpu") if prequantized is not None else device
        with torch.device(build_device):
            # Parameters are torch.empty: those the swap replaces are never written, so never resident.
            model = MODEL_REGISTRY[config.model_type](config, dtype=dtype)
            formats = plan_quantization(model, quantization, tensor_types=tensor_types, device=device,
                                        prequantized=prequantized)
            quantize_modules(model, formats)
        model.to(device)
    if formats:
        names = Counter(" + ".join(f) if isinstance(f, tuple) else str(f) for f in formats.values())
        logger.info("quantized %s", ", ".join(f"{n} {f}" for f, n in sorted(names.items())))
    # Lazy tensors let a quantized parameter read a block of rows at a time.
    lazy = bool(formats)
    if files.format == "gguf":
        weights = ckpt.iter_weights(dtype, lazy=lazy)
        del ckpt  # its vocabulary is in the tokenizer now: free it before the weights arrive
    else:
        weights = iter_safetensors(files.path, dtype, lazy=lazy)
    bar = tqdm(
        weights, total=total, desc=f"Loading {files.name}", unit=" tensors", file=sys.stderr,
        disable=not progress, leave=False,
    )
    load_weights(model, bar, renames=prequantized[0].renames if prequantized else None)
    model.eval()
    return LoadedModel(model, config, generation_config, tokenizer, files.name, pooling)
