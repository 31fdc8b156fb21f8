"""The memory plan (qwenkit/memory_plan.py): weights as loaded for each stored format against
the bytes the loaded model holds, the refusal line on a machine too small (its memory faked),
the published variant it names, show / list / pull without torch, the quantized short names."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_gguf import write_gguf
from test_prequantized import _float_checkpoint, _quantize
from test_quant import _mixed_type, _tiny_gguf_model

from qwenkit import LLM, memory_plan
from qwenkit.cli import main
from qwenkit.memory_plan import GIB, check_fits, config_shape, plan_memory, weight_bytes
from qwenkit.model_files import resolve_model
from qwenkit.model_names import lookup

ROOT = Path(__file__).parent.parent
# Measured: float safetensors and compressed-tensors exact to 0.1%, AWQ exact, GPTQ +2% (g_idx
# is read, not held), GGUF +0.8% (mixed K-quants) to +5.2% (Q8_0: rows repacked at load).
TOLERANCE = 0.06

# Qwen/Qwen3-30B-A3B's published config.json (the fields the plan reads).
QWEN3_30B_A3B = {"num_hidden_layers": 48, "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4,
                 "head_dim": 128, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
                 "num_experts_per_tok": 8, "vocab_size": 151936, "max_position_embeddings": 40960,
                 "tie_word_embeddings": False}


def held_bytes(llm) -> int:
    """What the loaded model holds: every tensor of its state, each storage once."""
    storages = {}
    for tensor in llm.model.state_dict().values():
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("formats")
    (root / "q").mkdir()
    source, tensors = root / "source", None
    tensors = _float_checkpoint(source, "qwen3_moe")
    paths = {"float": tiny_checkpoints("qwen3")}
    for method in ("fp8", "awq", "gptq4", "ct:W4A16"):
        paths[method] = _quantize(root / "q", source, tensors, method)[0]
    paths["gguf-k-quants"] = write_gguf(root / "mixed.gguf", _tiny_gguf_model(), "qwen2", weight_type=_mixed_type)
    paths["gguf-q8_0"] = write_gguf(root / "q8.gguf", _tiny_gguf_model(), "qwen2", weight_type="Q8_0")
    return paths


@pytest.mark.parametrize("fmt, dtype", [("float", "float32"), ("float", "bfloat16"), ("fp8", "float32"),
                                        ("awq", "float32"), ("gptq4", "float32"), ("ct:W4A16", "bfloat16"),
                                        ("gguf-k-quants", "float32"), ("gguf-q8_0", "float32")])
def test_weights_estimate_the_bytes_loaded(checkpoints, fmt, dtype):
    path = checkpoints[fmt]
    estimate = weight_bytes(resolve_model(str(path), progress=False), dtype)
    loaded = held_bytes(LLM(str(path), dtype=dtype, progress=False))
    assert loaded * (1 - 0.01) <= estimate <= loaded * (1 + TOLERANCE), (estimate, loaded)


def test_the_kv_cache_is_the_engines_pool(tiny_checkpoints):
    path = tiny_checkpoints("qwen3")
    files = resolve_model(str(path), progress=False)
    plan = memory_plan.plan_files(files, dtype="float32", kv_cache_memory=1 << 20)
    llm = LLM(str(path), dtype="float32", kv_cache_memory=1 << 20, progress=False)
    assert 0 <= plan.kv_tokens - llm.engine.num_kv_tokens < 16  # the engine keeps whole blocks of 16
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for layer in llm.engine.runner.kv_caches for t in layer}
    per_token = plan.kv_cache // plan.kv_tokens
    assert 0 <= plan.kv_cache - sum(storages.values()) < 16 * per_token


def test_a_model_too_big_is_refused_with_a_variant_that_fits(tmp_path):
    shape = config_shape(QWEN3_30B_A3B)
    assert 30.0e9 < shape.num_parameters < 31.0e9  # Qwen3-30B-A3B: 30.5B
    plan = plan_memory(shape, shape.num_parameters * 2, device="cpu", dtype="bfloat16")
    folder = tmp_path / "Qwen3-30B-A3B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    from qwenkit.model_files import ModelFiles

    files = ModelFiles("hf", folder, "Qwen/Qwen3-30B-A3B")
    with pytest.raises(memory_plan.QwenkitError) as e:
        check_fits(files, plan, 24 * GIB, name="qwen3:30b-a3b")
    line = str(e.value)
    assert "\n" not in line
    assert "this machine has" in line
    assert line.startswith("qwen3:30b-a3b needs 59.0 GiB (weights 56.9")  # 61 GB of bfloat16 weights, KV 2 GiB
    assert "this machine has 24.0 GiB free" in line
    # The best published variant that fits: Q6_K would need 25 GiB, Q5_K_M 22.4, Q4_K_M 19.3.
    assert line.split("; ")[1].startswith("qwen3:30b-a3b-q5_k_m needs 22.4 GiB")
    assert "qwen3:30b-a3b-q4_k_m needs 19." in str(pytest.raises(memory_plan.QwenkitError, check_fits, files, plan,
                                                                   21 * GIB, name="qwen3:30b-a3b").value)
    check_fits(files, plan, 80 * GIB)  # fits: no error


def test_run_refuses_on_a_small_machine_and_loads_when_told(tiny_checkpoints, monkeypatch, capsys):
    monkeypatch.setattr(memory_plan, "available_memory", lambda device="cpu": 1 << 10)
    argv = ["run", "--model", str(tiny_checkpoints("qwen3")), "--max-tokens", "2", "--json", "hi"]
    assert main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and " needs " in errors[0] and "this machine has 0.0 GiB free" in errors[0], errors
    assert "--no-memory-check" in errors[0]
    assert main([*argv, "--no-memory-check"]) == 0
    monkeypatch.setenv(memory_plan.NO_CHECK_ENV, "1")
    assert main(argv) == 0


def test_show_and_list_print_the_need_without_torch(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints("qwen3")
    code = ("import sys, json; from qwenkit.cli import main; main(['show', sys.argv[1]]); "
            "main(['show', '--json', sys.argv[1]]); main(['list']); assert 'torch' not in sys.modules, 'torch'")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QWENKIT_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub")}
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    memory = next(line for line in r.stdout.splitlines() if line.startswith("memory"))
    assert re.fullmatch(r"memory +\d+\.\d GiB \(weights \d+\.\d, KV cache \d+\.\d for [\d,]+ tokens, "
                        r"activations \d+\.\d\) on the CPU in \w+; \d+\.\d GiB free here: fits", memory), memory
    shown = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("{")))
    m = shown["memory"]
    assert m["weights_bytes"] == weight_bytes(resolve_model(str(path), progress=False), m["dtype"]) > 0
    assert m["total_bytes"] == m["weights_bytes"] + m["kv_cache_bytes"] + m["activations_bytes"]


def test_list_has_a_needs_column(default_gguf, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "NEEDS" in out[0]
    row = next(line for line in out if "Qwen2.5-Coder-0.5B" in line)
    assert "2.6 GiB" in row


def test_pull_warns_before_downloading_what_cannot_run_here(tiny_checkpoints, monkeypatch, capsys):
    from qwenkit import hub

    files = resolve_model(str(tiny_checkpoints("qwen3")), progress=False)
    events = []
    big = plan_memory(config_shape(QWEN3_30B_A3B), 61 * GIB, dtype="bfloat16")
    monkeypatch.setattr(hub, "plan_remote", lambda spec, file: events.append("plan") or big)
    monkeypatch.setattr(hub, "pull", lambda spec, file, progress: events.append("pull") or files)
    monkeypatch.setattr(memory_plan, "available_memory", lambda device="cpu": 24 * GIB)
    assert main(["pull", "qwen3:30b-a3b"]) == 0
    assert events == ["plan", "pull"]  # warned first, pulled anyway
    err = capsys.readouterr().err
    assert "warning: qwen3:30b-a3b needs 6" in err and "this machine has 24.0 GiB free" in err


def test_quantized_short_names():
    assert lookup("qwen3:8b-fp8").repo_id == "Qwen/Qwen3-8B-FP8"
    assert lookup("qwen3:32b-awq").repo_id == "Qwen/Qwen3-32B-AWQ"
    assert lookup("qwq:32b-awq").repo_id == "Qwen/QwQ-32B-AWQ"
    assert lookup("qwen3:235b-a22b-fp8").repo_id == "Qwen/Qwen3-235B-A22B-FP8"
    assert lookup("qwen3:30b-a3b-q4_k_m").quantization == "q4_k_m"
    with pytest.raises(ValueError, match="-fp8 / -awq"):
        lookup("qwen3:0.6b-awq")
