"""Short model names, as Ollama users type them: ``qwen3:8b``, ``qwen3:8b-q4_k_m``, ``qwq``.

One table, :data:`QWEN_MODELS`, maps each name to the Qwen team's own Hugging Face
repos; README.md and docs/models.md show the same table. A name is
``family:size[-variant][-QUANT]``:

* without a quantization it is the safetensors repo (the reference weights, bf16);
* with one (``-q4_k_m``, ``-q8_0``, :data:`QUANTIZATIONS`) it is that GGUF file of the
  Qwen team's GGUF repo, found by its name ending (``Qwen3-8B-Q4_K_M.gguf``,
  ``qwen2.5-coder-0.5b-instruct-q4_k_m.gguf``);
* a bare family (``qwen3``) is its ``latest`` size, as in Ollama;
* ``-fp8`` and ``-awq`` name the Qwen team's own pre-quantized safetensors repos
  (:data:`QUANTIZED_REPOS`: ``qwen3:8b-fp8`` is Qwen/Qwen3-8B-FP8), read as stored.

Names are case-insensitive. Plain data and string handling: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# name: (safetensors repo, the Qwen team's GGUF repo or None where it publishes none)
QWEN_MODELS: dict[str, tuple[str, str | None]] = {
    "qwen3:0.6b": ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B-GGUF"),
    "qwen3:1.7b": ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-1.7B-GGUF"),
    "qwen3:4b": ("Qwen/Qwen3-4B", "Qwen/Qwen3-4B-GGUF"),
    "qwen3:8b": ("Qwen/Qwen3-8B", "Qwen/Qwen3-8B-GGUF"),
    "qwen3:14b": ("Qwen/Qwen3-14B", "Qwen/Qwen3-14B-GGUF"),
    "qwen3:32b": ("Qwen/Qwen3-32B", "Qwen/Qwen3-32B-GGUF"),
    "qwen3:30b-a3b": ("Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B-GGUF"),
    "qwen3:235b-a22b": ("Qwen/Qwen3-235B-A22B", "Qwen/Qwen3-235B-A22B-GGUF"),
    "qwen3:4b-instruct-2507": ("Qwen/Qwen3-4B-Instruct-2507", None),
    "qwen3:4b-thinking-2507": ("Qwen/Qwen3-4B-Thinking-2507", None),
    "qwen3:30b-a3b-instruct-2507": ("Qwen/Qwen3-30B-A3B-Instruct-2507", None),
    "qwen3:30b-a3b-thinking-2507": ("Qwen/Qwen3-30B-A3B-Thinking-2507", None),
    "qwen2.5:0.5b": ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct-GGUF"),
    "qwen2.5:1.5b": ("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct-GGUF"),
    "qwen2.5:3b": ("Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-3B-Instruct-GGUF"),
    "qwen2.5:7b": ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct-GGUF"),
    "qwen2.5:14b": ("Qwen/Qwen2.5-14B-Instruct", "Qwen/Qwen2.5-14B-Instruct-GGUF"),
    "qwen2.5:32b": ("Qwen/Qwen2.5-32B-Instruct", "Qwen/Qwen2.5-32B-Instruct-GGUF"),
    "qwen2.5:72b": ("Qwen/Qwen2.5-72B-Instruct", "Qwen/Qwen2.5-72B-Instruct-GGUF"),
    "qwen2.5-coder:0.5b": ("Qwen/Qwen2.5-Coder-0.5B-Instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF"),
    "qwen2.5-coder:1.5b": ("Qwen/Qwen2.5-Coder-1.5B-Instruct", "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF"),
    "qwen2.5-coder:3b": ("Qwen/Qwen2.5-Coder-3B-Instruct", "Qwen/Qwen2.5-Coder-3B-Instruct-GGUF"),
    "qwen2.5-coder:7b": ("Qwen/Qwen2.5-Coder-7B-Instruct", "Qwen/Qwen2.5-Coder-7B-Instruct-GGUF"),
    "qwen2.5-coder:14b": ("Qwen/Qwen2.5-Coder-14B-Instruct", "Qwen/Qwen2.5-Coder-14B-Instruct-GGUF"),
    "qwen2.5-coder:32b": ("Qwen/Qwen2.5-Coder-32B-Instruct", "Qwen/Qwen2.5-Coder-32B-Instruct-GGUF"),
    "qwq:32b": ("Qwen/QwQ-32B", "Qwen/QwQ-32B-GGUF"),
    # Vision-language (docs/vision.md): safetensors only (a GGUF needs llama.cpp's mmproj file, not read yet).
    "qwen2.5-vl:3b": ("Qwen/Qwen2.5-VL-3B-Instruct", None),
    "qwen2.5-vl:7b": ("Qwen/Qwen2.5-VL-7B-Instruct", None),
    "qwen2.5-vl:32b": ("Qwen/Qwen2.5-VL-32B-Instruct", None),
    "qwen2.5-vl:72b": ("Qwen/Qwen2.5-VL-72B-Instruct", None),
    "qwen3-vl:2b": ("Qwen/Qwen3-VL-2B-Instruct", None),
    "qwen3-vl:4b": ("Qwen/Qwen3-VL-4B-Instruct", None),
    "qwen3-vl:8b": ("Qwen/Qwen3-VL-8B-Instruct", None),
    "qwen3-vl:32b": ("Qwen/Qwen3-VL-32B-Instruct", None),
    "qwen3-vl:30b-a3b": ("Qwen/Qwen3-VL-30B-A3B-Instruct", None),
    "qwen3-vl:235b-a22b": ("Qwen/Qwen3-VL-235B-A22B-Instruct", None),
}

# The Qwen team's pre-quantized safetensors repos (FP8 block-quantized; AWQ 4-bit, groups of 128).
QUANTIZED_REPOS: dict[str, str] = {
    **{f"qwen3:{size}-fp8": f"Qwen/Qwen3-{size.upper()}-FP8"
       for size in ("0.6b", "1.7b", "4b", "8b", "14b", "32b", "30b-a3b", "235b-a22b")},
    **{f"qwen3:{size}-awq": f"Qwen/Qwen3-{size.upper()}-AWQ" for size in ("4b", "8b", "14b", "32b")},
    "qwq:32b-awq": "Qwen/QwQ-32B-AWQ",
    **{f"qwen2.5:{size}-awq": f"Qwen/Qwen2.5-{size.upper()}-Instruct-AWQ" for size in ("7b", "14b", "32b", "72b")},
}

# What a bare family name means, as Ollama's `latest` tags.
LATEST = {"qwen3": "qwen3:8b", "qwen2.5": "qwen2.5:7b", "qwen2.5-coder": "qwen2.5-coder:7b", "qwq": "qwq:32b",
          "qwen2.5-vl": "qwen2.5-vl:7b", "qwen3-vl": "qwen3-vl:8b"}

# GGUF quantizations qwenkit reads (Q4_K_M mixes Q4_K and Q6_K tensors; f16/fp16 are spellings of one).
QUANTIZATIONS = ("q4_0", "q4_k_m", "q5_0", "q5_k_m", "q6_k", "q8_0", "f16", "fp16", "bf16")

_SHORT_NAME = re.compile(r"[a-z][a-z0-9.]*(-[a-z0-9.]+)*(:[a-z0-9._-]+)?")


@dataclass(frozen=True)
class HubModel:
    """What a short name stands for: a repo, and the GGUF quantization to take from it
    (None: the repo is a safetensors checkpoint)."""

    name: str  # canonical spelling, e.g. "qwen3:8b-q4_k_m"
    repo_id: str
    quantization: str | None = None

    def is_its_file(self, filename: str) -> bool:
        """Whether a GGUF file of the repo is this quantization's: its name ends in
        "-q4_k_m.gguf" (any case; f16 and fp16 are one)."""
        spellings = {"f16", "fp16"} if self.quantization in ("f16", "fp16") else {self.quantization}
        return any(filename.lower().endswith(f"-{q}.gguf") for q in spellings)


def is_short_name(spec: str) -> bool:
    """Whether `spec` is spelled like a short name (it may still be an unknown one)."""
    spec = spec.lower()
    return ":" in spec and _SHORT_NAME.fullmatch(spec) is not None or spec in LATEST


def lookup(spec: str) -> HubModel:
    """The repo (and quantization) a short name names; ValueError saying what exists."""
    name = LATEST.get(spec.lower(), spec.lower())
    if name in QWEN_MODELS:
        return HubModel(name, QWEN_MODELS[name][0])
    if name in QUANTIZED_REPOS:
        return HubModel(name, QUANTIZED_REPOS[name])
    base, _, quantization = name.rpartition("-")
    if base in QWEN_MODELS and quantization in QUANTIZATIONS:
        gguf_repo = QWEN_MODELS[base][1]
        if gguf_repo is None:
            raise ValueError(
                f"the Qwen team publishes no GGUF of {base} ({QWEN_MODELS[base][0]}): use {base} "
                "(safetensors), or pull another repo's file with `qwenkit pull OWNER/REPO FILE.gguf`"
            )
        return HubModel(name, gguf_repo, quantization)
    if base in QWEN_MODELS and quantization in ("fp8", "awq"):
        published = [n for n in QUANTIZED_REPOS if n.endswith(f"-{quantization}")]
        raise ValueError(f"the Qwen team publishes no {quantization.upper()} repo of {base}; -fp8 / -awq names: "
                         + ", ".join(published))
    if base in QWEN_MODELS:
        raise ValueError(f"unknown quantization {quantization!r} in {spec!r}; qwenkit reads "
                         + ", ".join(QUANTIZATIONS))
    family = name.partition(":")[0]
    known = [n for n in QWEN_MODELS if n.startswith(family + ":")] or list(LATEST)
    raise ValueError(f"unknown model name {spec!r}; known: {', '.join(known)} "
                     "(add -QUANT, e.g. -q4_k_m, for a GGUF, or -fp8 / -awq where the Qwen team publishes "
                     "one); `qwenkit list` shows what is on this machine")


def short_name_of(repo_id: str, filename: str | None = None) -> str | None:
    """The short name of a repo (and GGUF file) from the table, or None."""
    if filename is None:
        for name, repo in QUANTIZED_REPOS.items():
            if repo == repo_id:
                return name
    for name, (repo, gguf_repo) in QWEN_MODELS.items():
        if filename is None and repo == repo_id:
            return name
        if filename is not None and gguf_repo == repo_id:
            lower = filename.lower()
            for quantization in QUANTIZATIONS:
                if lower.endswith(f"-{quantization}.gguf"):
                    return f"{name}-{quantization}"
    return None
