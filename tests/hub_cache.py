"""A Hugging Face Hub cache on disk, built offline, and chat templates of the Qwen models
that think differently: for the tests of `qwenkit pull / list / show / rm`, short names
and capabilities.

The cache layout is huggingface_hub's: ``models--OWNER--NAME/blobs/<hash>`` holds the
files, ``snapshots/<commit>/<file>`` links to them, ``refs/main`` names the commit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

COMMIT = "0123456789abcdef0123456789abcdef01234567"

# Qwen2.5-Instruct's template (the default model's GGUF carries it), abridged: the branches
# rendering past tool calls and results left out. Tools, no thinking.
QWEN25_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.' }}{%- endif %}{{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user "
    "query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}"
    "{%- for tool in tools %}{{- \"\\n\" }}{{- tool | tojson }}{%- endfor %}{{- \"\\n</tools>\\n\\nFor each "
    "function call, return a json object with function name and arguments within <tool_call></tool_call> XML "
    "tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call>"
    "<|im_end|>\\n\" }}{%- else %}{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + "
    "messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by "
    "Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == \"user\") or (message.role == \"system\" and not "
    "loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}{{- '<|im_start|>' + "
    "message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# QwQ-32B's (and Qwen3-*-Thinking-2507's) generation prompt opens thinking itself: it always thinks.
QWQ_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}"
    "{%- endif %}"
)

# Qwen3-*-Instruct-2507: the think tokens are in the vocabulary, but the template never thinks.
INSTRUCT_2507_TEMPLATE = QWQ_TEMPLATE.replace("<think>\\n", "")


def set_chat_template(folder: Path, template: str) -> None:
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))


def add_snapshot(cache: Path, repo_id: str, files: dict[str, Path | bytes], *, commit: str = COMMIT) -> Path:
    """Put `files` (name: a file to copy, or its bytes) in the cache as `repo_id`'s snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, content in files.items():
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.unlink(missing_ok=True)
        link.symlink_to(Path("..", "..", "blobs", blob.name))
    return snapshot


def add_folder(cache: Path, repo_id: str, folder: Path) -> Path:
    """A checkpoint folder (config.json, *.safetensors, tokenizer files) as a cached repo."""
    return add_snapshot(cache, repo_id, {p.name: p for p in folder.iterdir() if p.is_file()})


def write_tiny_gguf(path: Path, *, tokens: list[str], chat_template: str | None, file_type: int = 15) -> Path:
    """A small qwen3 GGUF with the metadata `qwenkit list` / `show` read: not a loadable model
    (two tensors), enough for the architecture, parameter count, file type and template."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_context_length(4096)
    writer.add_file_type(file_type)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target
