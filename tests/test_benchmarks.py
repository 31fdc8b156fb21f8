"""The benchmark scripts still run against the code they measure (their figures are not
checked here: speed belongs to the benchmarks, docs/benchmarks.md).

benchmarks/compare_llamacpp.py once failed only when someone ran it, after a signature in
`qwenkit.bench` changed: its qwenkit side runs here in small, on the default model. The
llama.cpp side needs llama-cpp-python built from source, not a test dependency.
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
LLAMACPP_PERPLEXITY = 8.771  # llama.cpp's on the script's text and this model (docs/benchmarks.md)


@pytest.fixture(scope="module")
def compare_llamacpp(monkeypatch_module):
    monkeypatch_module.syspath_prepend(str(BENCHMARKS))
    import compare_llamacpp

    return compare_llamacpp


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_compare_llamacpp_qwenkit_side(compare_llamacpp, default_gguf):
    c = compare_llamacpp
    assert len(c.BATCH_TASKS) == len(set(c.BATCH_TASKS)) == 164
    args = Namespace(threads=2, ctx=1024, streams=2, decode_tokens=4, greedy_tokens=4, dtype=None,
                     quantization="auto", kv_cache_dtype="auto", kv_unified=True, prompt_tokens=48,
                     batch_prompts=3, batch_tokens=6, batch_seqs=2)
    workload = c.build_workload(default_gguf, args)
    assert len(workload["prefill_ids"]) == 48 and len(workload["batch_prompts"]) == 3
    worker = c.QwenkitWorker(workload)

    speed = worker.speed()
    for key in ("prefill_tok_s", "decode_1_tok_s", "decode_n_tok_s", "peak_rss_mb", "load_s"):
        assert speed[key] > 0, key
    assert speed["kernels"] and speed["kv_cache_bytes"] > 0

    batch = worker.batch()
    assert batch["max_num_seqs"] == 2 and 3 <= batch["tokens"] <= 3 * 6

    quality = worker.quality()
    assert [len(g) for g in quality["greedy"]] == [4] * len(c.GREEDY_PROMPTS)
    # The same weights as llama.cpp on the same text: the script's perplexity agrees with it.
    assert quality["perplexity"] == pytest.approx(LLAMACPP_PERPLEXITY, rel=0.02)

    # The report, with these results standing in for llama.cpp's too: every ratio is 1.
    stand_in = {**speed, "version": "-", "system_info": "-", "kv_unified": True, "n_batch": 2048}
    results = {"qwenkit": {"speed": [speed], "batch": batch, "quality": quality},
               "llamacpp": {"speed": [stand_in], "batch": batch, "quality": quality}}
    summary = c.summarize(workload, results)
    summary["load_average"] = {"before": 0.0, "after": 0.0}
    text = c.report(summary)
    assert "issue #16's targets for an" in text and "decode, 1 stream: 1.000x (target >= " in text
    assert "batch workload (smaller than the target workload" in text


def test_batch_tasks_repeat_numbered_past_the_list(compare_llamacpp):
    tasks = compare_llamacpp.batch_tasks(166)
    assert tasks[:164] == compare_llamacpp.BATCH_TASKS
    assert tasks[164] == f"{tasks[0]} (#164)" and len(set(tasks)) == 166


def test_gguf_shape_copy_keeps_the_layout_and_repeats_first_rows(monkeypatch, tmp_path):
    """benchmarks/gguf_shape_copy.py: the stand-in has the file's header byte for byte and
    every tensor's type, shape and offset, each tensor's bytes its first rows repeated; it
    compresses to a fraction of the file."""
    import lzma

    import gguf
    from test_quant import _mixed_type, _tiny_gguf_model
    from test_gguf import write_gguf

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gguf_shape_copy

    src = write_gguf(tmp_path / "mixed.gguf", _tiny_gguf_model(), "qwen2", weight_type=_mixed_type)
    packed, copy = tmp_path / "shape.gguf.xz", tmp_path / "shape.gguf"
    gguf_shape_copy.shape_copy(src, packed, period_bytes=1024)
    copy.write_bytes(lzma.decompress(packed.read_bytes()))
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(copy)
    assert copy.stat().st_size == src.stat().st_size
    assert a.data[: a.data_offset].tobytes() == b.data[: b.data_offset].tobytes()
    assert packed.stat().st_size < src.stat().st_size / 4
    changed = 0
    for ta, tb in zip(a.tensors, b.tensors):
        layout = (ta.name, ta.tensor_type, list(ta.shape), ta.data_offset)
        assert layout == (tb.name, tb.tensor_type, list(tb.shape), tb.data_offset)
        raw_a = a.data[ta.data_offset : ta.data_offset + ta.n_bytes].tobytes()
        raw_b = b.data[tb.data_offset : tb.data_offset + tb.n_bytes].tobytes()
        rows = int(ta.shape[1]) if len(ta.shape) > 1 else 1
        row_bytes = ta.n_bytes // rows
        period = max(1, 1024 // row_bytes) * row_bytes if rows > 1 else ta.n_bytes
        assert raw_b[:period] == raw_a[:period]
        assert all(raw_b[i : i + period] == raw_b[: min(period, ta.n_bytes - i)] for i in range(0, ta.n_bytes, period))
        changed += raw_b != raw_a
    assert changed  # the larger tensors really were replaced


def test_ab_kernel_sources_runs_both_libraries(monkeypatch, default_gguf, capsys):
    """benchmarks/ab_kernel_sources.py reaches into the runner's decode path: it still runs (here
    this checkout's sources against themselves, the build cached by their hash)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import ab_kernel_sources

    from qwenkit.kernels import build, cpu

    if cpu.library() is None:
        pytest.skip("native CPU kernels off or not built here")
    library = cpu.library
    ab_kernel_sources.main(["--other", str(build.CSRC), "--model", str(default_gguf), "--context", "16",
                            "--steps", "2", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "decode step, 1 stream(s)" in out and "other / this:" in out
    assert cpu.library is library  # put back


def test_moe_gguf_30b_writes_a_q4_k_m_layout_qwenkit_loads(monkeypatch, tmp_path, default_gguf):
    """benchmarks/moe_gguf_30b.py's model, in a small shape: the types llama.cpp's Q4_K_M gives
    qwen3moe, experts kept in their blocks, and it decodes."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import moe_gguf_30b as m
    from qwenkit import LLM, SamplingParams
    from qwenkit.loader.gguf import GGUFCheckpoint
    from qwenkit.models.quant import GGUFExperts

    small = dict(m.CONFIG, hidden=256, heads=2, kv_heads=1, experts=4, experts_used=2, moe_intermediate=256)
    path = m.write_model(tmp_path / "moe.gguf", 2, small)
    types = {name: t.name for name, t in GGUFCheckpoint(path).tensor_types().items()}
    assert types["model.layers.0.mlp.experts.down_proj"] == "Q6_K"  # layer 0 < 48 / 8: more bits
    assert types["model.layers.1.mlp.experts.gate_proj"] == "Q4_K"
    full = {name: t.name for name, _, t in m.tensors(48)}
    assert [full[f"blk.{i}.ffn_down_exps.weight"] for i in (5, 6, 7, 8, 40, 42)] == ["Q6_K", "Q4_K", "Q4_K", "Q6_K",
                                                                                    "Q4_K", "Q6_K"]
    assert types["lm_head.weight"] == "Q6_K" and types["model.layers.0.mlp.gate.weight"] == "F32"
    llm = LLM(str(path), dtype="float32", max_model_len=64, kv_cache_memory=1 << 22, progress=False)
    experts = llm.model.model.layers[0].mlp.experts
    assert not isinstance(experts, GGUFExperts) or experts.types == ("Q4_K", "Q4_K", "Q6_K")
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3
