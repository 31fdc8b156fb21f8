"""Pre-quantized safetensors checkpoints loaded as stored (qwenkit/loader/prequantized.py,
qwenkit/models/prequantized.py): tiny random Qwen3 and Qwen3-MoE checkpoints written in each
published layout, against a float32 checkpoint of the same weights dequantized ("the twin").

The writers here take the integer values, zeros and scales as ground truth and pack them as each
format documents it: compressed-tensors through its own compressors (`PackedQuantizationCompressor`,
`FloatQuantizationCompressor`), AWQ's GEMM packing (nibble i of a word holds column
(0, 2, 4, 6, 1, 3, 5, 7)[i], as AutoAWQ's `WQLinear_GEMM` packs and gptqmodel's
`AWQ_REVERSE_ORDER` undoes), GPTQ's (input features 32 / bits to a word, zeros stored one less
in its original format, which gptqmodel's v1 -> v2 conversion adds back), Qwen's FP8 (DeepSeek's `weight_scale_inv` per 128 x 128 block, which
transformers' `Fp8Dequantize` multiplies). The twin is computed from those values alone, not by
qwenkit's code.

Bounds: weight-only formats run float32 activations on exactly the twin's weights, so the twin's
own 32 greedy tokens, fed step by step, get the same next-token choice at every step and
logprobs within float32 rounding (measured <= 1.7e-6, bound 1e-5). FP8 with dynamic per-token
activations rounds each activation to e4m3 (3 mantissa bits: up to 2^-4 of itself); on these
random models that moved the chosen tokens' logprobs by 0.02-0.03 on average, 0.12 at most, and
changed the choice only at near-ties (the twin's first two within 0.01): the test bounds the mean
by 0.15, the worst by 0.5, and lets a choice change only where the twin's margin is under twice
the worst error.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import SPECIAL_TOKENS, make_tokenizer

from qwenkit import LLM
from qwenkit.errors import ModelLoadError
from qwenkit.models import prequantized as pq
from qwenkit.models.attention import AttentionMetadata

transformers = pytest.importorskip("transformers")

STEPS = 32


def _config(arch: str, vocab_size: int) -> "transformers.PretrainedConfig":
    """Inputs of 128 and more: whole AWQ / GPTQ groups of 128; k and v of 64 rows, half an FP8 block."""
    common = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common)
    if arch == "qwen2":  # Qwen2.5's -GPTQ / -AWQ repos: biases on q, k and v, stored as floats
        common.pop("head_dim")
        return transformers.Qwen2Config(**common)
    return transformers.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                                       norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1])


def _float_checkpoint(folder: Path, arch: str) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True)
    make_tokenizer(folder)
    vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]) + len(SPECIAL_TOKENS)
    torch.manual_seed(0)
    cls = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
           "qwen3_moe": transformers.Qwen3MoeForCausalLM}[arch]
    model = cls(_config(arch, vocab)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 and "norm" in name else 0.06 * torch.randn_like(p))
    model.save_pretrained(folder)
    return load_file(folder / "model.safetensors")


def _quantized_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The matrices published checkpoints quantize: every projection, not the embedding, lm_head or router."""
    return [n for n in tensors if n.endswith("_proj.weight") and tensors[n].ndim == 2]


def _write(folder: Path, source: Path, tensors: dict[str, torch.Tensor], quantization_config: dict | None) -> None:
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text((source / name).read_text())
    config = json.loads((source / "config.json").read_text())
    if quantization_config:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")


# -- the writers: (quantized tensors, dequantized float32 weight) per matrix ----------------------


def _fp8_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Qwen / DeepSeek FP8: e4m3 weight, float32 weight_scale_inv per block (the last row block
    may be partial), and w = q * s."""
    n, k = w.shape
    scale = torch.stack([torch.stack([w[i : i + block, j : j + block].abs().amax() / 448 for j in range(0, k, block)])
                         for i in range(0, n, block)])
    full = scale.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    q = (w / full).to(torch.float8_e4m3fn)
    return q, scale, q.float() * full


def _int_values(w: torch.Tensor, bits: int, group: int, *, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """Unsigned values q [N, K], zeros z and scales s [N, K / group] (float16) with w ~ (q - z) s."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    top = (1 << bits) - 1
    if symmetric:
        scale = (g.abs().amax(-1) / (top / 2)).half()
        zero = torch.full_like(scale, 1 << (bits - 1), dtype=torch.int32)
    else:
        low, high = g.amin(-1), g.amax(-1)
        scale = ((high - low) / top).half()
        zero = (-low / scale.float()).round().clamp(0, top).int()
    q = (g / scale.float()[..., None] + zero[..., None]).round().clamp(0, top).int().reshape(n, k)
    return q, zero, scale


def _dequantized(q, zero, scale, group: int) -> torch.Tensor:
    return ((q - zero.repeat_interleave(group, 1)).float() * scale.float().repeat_interleave(group, 1))


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] unsigned values -> int32 [R * bits / 32, C], rows packed low bits first (GPTQ's qweight)."""
    per = 32 // bits
    v = values.to(torch.int64).reshape(-1, per, values.shape[1])
    words = sum(v[:, i] << (bits * i) for i in range(per))
    return ((words + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32)


def _awq(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    q, zero, scale = _int_values(w, 4, 128, symmetric=False)
    order = (0, 2, 4, 6, 1, 3, 5, 7)

    def pack(values):  # [R, N] -> [R, N / 8], nibble i of a word is column order[i] of its 8
        v = values.to(torch.int64).reshape(values.shape[0], -1, 8)
        words = sum(v[:, :, order[i]] << (4 * i) for i in range(8))
        return ((words + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32)

    return {"qweight": pack(q.t()), "qzeros": pack(zero.t()), "scales": scale.t()}, _dequantized(q, zero, scale, 128)


def _gptq(w: torch.Tensor, bits: int, *, desc_act: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    n, k = w.shape
    perm = torch.randperm(k) if desc_act else torch.arange(k)
    q, zero, scale = _int_values(w[:, perm], bits, 128, symmetric=True)  # groups over the permuted features
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = torch.arange(k, dtype=torch.int32) // 128
    q_orig = torch.empty_like(q)
    q_orig[:, perm] = q
    deq = (q_orig - zero[:, g_idx.long()]).float() * scale.float()[:, g_idx.long()]
    # The original format stores zeros one less (AutoGPTQ: zeros -= 1 before packing).
    tensors = {"qweight": _pack_rows(q_orig.t(), bits), "qzeros": _pack_rows(zero - 1, bits).t(),
               "scales": scale.t(), "g_idx": g_idx}
    return tensors, deq


def _compressed_tensors(tensors: dict[str, torch.Tensor], preset: str, folder: Path) -> tuple[dict, dict, dict]:
    """llm-compressor's layout, written by compressed-tensors' own compressors: each matrix
    quantized with the scales its `calculate_qparams` gives from the group / row min and max, then
    compressed (`weight_packed` + `weight_scale` (+ `weight_zero_point`), or an e4m3 `weight` +
    `weight_scale`); the twin is the compressor's own decompression."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    scheme = preset_name_to_scheme(preset, ["Linear"])
    args = scheme.weights
    compressor = PackedQuantizationCompressor if args.type == "int" else FloatQuantizationCompressor
    out, twin = dict(tensors), {k: v.float() for k, v in tensors.items()}
    for name in _quantized_names(tensors):
        module, w = name.removesuffix(".weight"), tensors[name].float()
        grouped = w.view(w.shape[0], -1, args.group_size) if args.strategy == "group" else w[:, None, :]
        scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
        state = {"weight": w, "weight_scale": scale}
        if not args.symmetric:
            state["weight_zero_point"] = zero
        compressed = compressor.compress(state, scheme)
        del out[name]
        out.update({f"{module}.{k}": v for k, v in compressed.items()})
        twin[name] = compressor.decompress(compressed, scheme)["weight"].float()
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head", "re:.*mlp.gate$"],
                                format="pack-quantized" if args.type == "int" else "float-quantized",
                                quantization_status=QuantizationStatus.COMPRESSED)
    quantization_config = {"quant_method": "compressed-tensors", "version": ct.__version__, "sparsity_config": {},
                           "transform_config": {}, **config.model_dump(mode="json", exclude=["quant_method"])}
    return out, twin, quantization_config


def _quantize(folder: Path, source: Path, tensors: dict[str, torch.Tensor], method: str) -> tuple[Path, Path]:
    """Write `method`'s checkpoint of `tensors` and its float32 twin; return both folders."""
    if method.startswith("ct:"):
        out, twin, config = _compressed_tensors(tensors, method[3:], folder)
        method = method.replace(":", "-")
        _write(folder / method, source, out, config)
        _write(folder / f"{method}-twin", source, twin, None)
        return folder / method, folder / f"{method}-twin"
    out, twin = dict(tensors), {k: v.float() for k, v in tensors.items()}
    torch.manual_seed(1)
    for name in _quantized_names(tensors):
        module = name.removesuffix(".weight")
        w = tensors[name].float()
        del out[name]
        if method == "fp8":
            q, scale, twin[name] = _fp8_blocks(w)
            out[f"{module}.weight"], out[f"{module}.weight_scale_inv"] = q, scale
        elif method == "awq":
            parts, twin[name] = _awq(w)
            out.update({f"{module}.{k}": v for k, v in parts.items()})
        elif method.startswith("gptq"):
            parts, twin[name] = _gptq(w, int(method[4]), desc_act="desc" in method)
            out.update({f"{module}.{k}": v for k, v in parts.items()})
    config = {
        "fp8": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
        "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None},
        "gptq4": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
        "gptq8": {"quant_method": "gptq", "bits": 8, "group_size": 128, "desc_act": False, "sym": True},
        "gptq4-desc": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True},
    }[method]
    _write(folder / method, source, out, config)
    _write(folder / f"{method}-twin", source, twin, None)
    return folder / method, folder / f"{method}-twin"


# -- the comparison -----------------------------------------------------------------------------


def _step_by_step(llm: LLM, prompt: list[int], tokens: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """(the tokens after `prompt`, the logprobs [STEPS, vocab] each was chosen from), one decode
    step a token: greedy, or `tokens` fed whatever this model would choose."""
    with torch.inference_mode():
        kv = llm.model.allocate_kv_cache(len(prompt) + STEPS)
        ids, rows = list(prompt), []
        for i in range(len(prompt) + STEPS - 1):
            meta = AttentionMetadata.contiguous(start=i, num_tokens=1)
            hidden = llm.model(torch.tensor([ids[i]]), torch.tensor([i]), kv, meta)
            if i >= len(prompt) - 1:
                rows.append(torch.log_softmax(llm.model.compute_logits(hidden)[0], -1))
                step = len(rows) - 1
                ids.append(int(rows[-1].argmax()) if tokens is None else tokens[step])
        return ids[len(prompt):], torch.stack(rows)


def _load(folder: Path) -> LLM:
    return LLM(str(folder), dtype="float32", progress=False)


def _compare(quantized: Path, twin: Path, *, margins: list | None = None) -> tuple[int, float, float]:
    """(steps whose greedy choice agrees, max and mean |logprob error| of the chosen tokens) over
    the twin's own 32 greedy tokens after a short prompt, fed step by step. margins: filled with
    the twin's gap between its first and second choice at each step that disagrees."""
    prompt = [5, 17, 42, 99]
    tokens, want = _step_by_step(_load(twin), prompt)
    _, got = _step_by_step(_load(quantized), prompt, tokens)
    chosen = torch.tensor(tokens)[:, None]
    agrees = got.argmax(-1) == chosen[:, 0]
    error = (got.gather(1, chosen) - want.gather(1, chosen)).abs()
    if margins is not None:
        top2 = want.topk(2, dim=-1).values
        margins.extend((top2[:, 0] - top2[:, 1])[~agrees].tolist())
    return int(agrees.sum()), error.max().item(), error.mean().item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: OpenMP's hand-offs cost more than the work on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("prequantized")
    return {arch: (root / arch, _float_checkpoint(root / arch, arch)) for arch in ("qwen2", "qwen3", "qwen3_moe")}


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("method", ["fp8", "awq", "gptq4", "gptq8", "gptq4-desc", "ct:W4A16", "ct:W4A16_ASYM",
                                    "ct:W8A16"])
def test_weight_only_formats_agree_with_the_dequantized_twin(tmp_path, sources, arch, method):
    _check_weight_only(tmp_path, sources, arch, method)


@pytest.mark.parametrize("method", ["gptq4", "gptq8", "awq"])
def test_qwen2_5_layouts_with_biases(tmp_path, sources, method):
    """Qwen2.5-*-GPTQ-Int4 / -Int8 / -AWQ: a qwen2 model, its q / k / v biases next to the packed weights."""
    _check_weight_only(tmp_path, sources, "qwen2", method)


def _check_weight_only(tmp_path, sources, arch, method):
    source, tensors = sources[arch]
    quantized, twin = _quantize(tmp_path, source, tensors, method)
    agree, worst, mean = _compare(quantized, twin)
    assert agree == STEPS
    assert worst <= 1e-5, (worst, mean)


def test_fp8_activation_rounding_is_compressed_tensors_own():
    """The activations' e4m3 rounding per token is exactly what compressed-tensors' FP8_DYNAMIC
    scheme computes (its scale from the token's min and max, then quantize and dequantize)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).input_activations
    x = torch.randn(7, 256) * torch.logspace(-3, 2, 7)[:, None]
    scale, zero = calculate_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), args)
    want = dequantize(quantize(x, scale, None, args), scale, None, args)
    assert torch.equal(pq.quantize_fp8_activations(x, -1), want)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_fp8_dynamic_activations_agree_within_e4m3_rounding(tmp_path, sources, arch):
    """compressed-tensors FP8_DYNAMIC: e4m3 weights per channel, activations rounded to e4m3 per token
    (3 mantissa bits: each activation off by up to 2^-4 of itself). On these random models, whose
    next-token distributions are nearly flat, that moved the chosen tokens' logprobs by 0.033 / 0.020
    on average (0.12 / 0.065 at most, dense / MoE); the dense model's choice changed at 2 of 32
    steps, where the twin's first two choices were within 0.003 and 0.009 of each other."""
    source, tensors = sources[arch]
    margins: list[float] = []
    agree, worst, mean = _compare(*_quantize(tmp_path, source, tensors, "ct:FP8_DYNAMIC"), margins=margins)
    assert mean < 0.15 and worst < 0.5, (agree, worst, mean)
    assert all(m < 2 * worst for m in margins), (margins, worst)
    assert agree >= STEPS // 2, (agree, margins)


@pytest.mark.parametrize("method", ["fp8", "ct:W4A16"])
def test_transformers_reads_the_same_checkpoint(tmp_path, sources, method):
    """transformers dequantizes these on the CPU (FP8: `Fp8Dequantize`; compressed-tensors: its
    decompression): the prompt's logits agree with qwenkit's stored-format load to float32 rounding."""
    if method.startswith("ct:"):
        pytest.importorskip("compressed_tensors")
    source, tensors = sources["qwen3"]
    quantized, _ = _quantize(tmp_path, source, tensors, method)
    reference = transformers.AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.float32).eval()
    ids = [5, 17, 42, 99, 3, 8, 250]
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    model = _load(quantized).model
    with torch.inference_mode():
        kv = model.allocate_kv_cache(len(ids))
        meta = AttentionMetadata.contiguous(start=0, num_tokens=len(ids))
        got = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), kv, meta))
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("method,most", [("fp8", 0.53), ("awq", 0.27), ("gptq8", 0.52), ("ct:W4A16", 0.27)])
def test_weights_stay_quantized_in_memory(tmp_path, sources, method, most):
    """The quantized matrices' bytes in memory against the same matrices in bfloat16 (what the
    Qwen team's unquantized checkpoints store): e4m3 8 bits and 4-bit words plus their scales."""
    source, tensors = sources["qwen3_moe"]
    model = _load(_quantize(tmp_path, source, tensors, method)[0]).model
    stored = [m for m in model.modules() if isinstance(m, pq.StoredMatrix)]
    assert any(m.num_experts for m in stored) and any(not m.num_experts for m in stored)
    bf16 = sum(2 * max(1, m.num_experts) * sum(m.output_sizes) * m.in_features for m in stored)
    assert sum(m.stored_bytes() for m in stored) <= most * bf16


# -- bad input ------------------------------------------------------------------------------------


def _edit(folder: Path, *, config=None, tensors=None) -> None:
    if config is not None:
        data = json.loads((folder / "config.json").read_text())
        config(data["quantization_config"])
        (folder / "config.json").write_text(json.dumps(data))
    if tensors is not None:
        loaded = load_file(folder / "model.safetensors")
        tensors(loaded)
        save_file(loaded, folder / "model.safetensors")


def _cli_error(folder: Path, capsys, *args: str) -> str:
    from qwenkit.cli import main

    assert main(["run", "--model", str(folder), "--max-tokens", "1", *args, "Hello"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1
    return lines[0]


def test_bad_checkpoints_get_one_error_line(tmp_path, sources, capsys):
    source, tensors = sources["qwen3"]
    awq, _ = _quantize(tmp_path, source, tensors, "awq")
    name = "model.layers.1.self_attn.k_proj.scales"
    _edit(awq, tensors=lambda t: t.update({name: t[name][:, :32].contiguous()}))
    line = _cli_error(awq, capsys)
    assert name in line and "expected shape (1, 64), got (1, 32)" in line

    fp8, _ = _quantize(tmp_path, source, tensors, "fp8")
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"
    _edit(fp8, tensors=lambda t: t.update({name: torch.ones(2, 2)}))
    line = _cli_error(fp8, capsys)
    assert name in line and "expected shape (1, 2), got (2, 2)" in line
    assert "--quantization int8 does not apply" in _cli_error(fp8, capsys, "--quantization", "int8")

    _edit(fp8, config=lambda c: c.update(quant_method="bitsandbytes"))
    assert "unsupported quantization method 'bitsandbytes'" in _cli_error(fp8, capsys)

    gptq, _ = _quantize(tmp_path, source, tensors, "gptq4")
    _edit(gptq, config=lambda c: c.update(bits=3))
    assert "(gptq): bits 3" in _cli_error(gptq, capsys)
    _edit(awq, config=lambda c: c.update(version="gemv"))
    assert "(awq): version 'gemv'" in _cli_error(awq, capsys)


def test_packing_round_trips_and_fp8_row_blocks_follow_the_shards():
    values = torch.randint(0, 16, (64, 24), dtype=torch.int32)
    for dim in (0, -1):
        assert torch.equal(pq.unpack_int32(pq.pack_int32(values, 4, dim), 4, dim), values)
    bytes_ = torch.randint(0, 256, (16, 8), dtype=torch.int32)
    assert torch.equal(pq.unpack_int32(pq.pack_int32(bytes_, 8, 0), 8, 0), bytes_)
    # q of 192 rows (a block and a half), k and v of 64 (half a block each): 2 + 1 + 1 row blocks.
    layer = pq.StoredQuantLinear(256, [192, 64, 64], bias=False, dtype=torch.float32,
                                 format=pq.StoredFormat(pq.FP8, "fp8", block=(128, 128)), shard_names=("q", "k", "v"))
    assert layer.row_block.tolist() == [0] * 128 + [1] * 64 + [2] * 64 + [3] * 64
    w = torch.randn(320, 256)
    for name, rows, part in (("q", slice(0, 192), 0), ("k", slice(192, 256), 1), ("v", slice(256, 320), 2)):
        scale = torch.rand(2 if name == "q" else 1, 2) + 0.5
        layer.weight.weight_loader(layer.weight, w[rows].to(torch.float8_e4m3fn), name)
        layer.weight_scale.weight_loader(layer.weight_scale, scale, name)
        full = scale.repeat_interleave(128, 0)[: rows.stop - rows.start].repeat_interleave(128, 1)
        assert torch.equal(layer.dequantize()[rows],
                           w[rows].to(torch.float8_e4m3fn).float() * full)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("method", ["fp8", "awq", "gptq4-desc", "ct:W4A16"])
def test_cuda_engine_on_stored_weights(tmp_path, sources, arch, method):
    """On CUDA through the engine (Triton kernels, CUDA graphs where the model allows them), in
    float32: the kernels multiply the twin's own weights in IEEE float32 (cuBLAS too: no TF32 by
    default), so the greedy tokens are the twin's. (In bfloat16 the two sum in different orders,
    and these random models have near-ties within 0.003.)"""
    from qwenkit import SamplingParams

    source, tensors = sources[arch]
    quantized, twin = _quantize(tmp_path, source, tensors, method)
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    prompt = [5, 17, 42, 99]
    want = LLM(str(twin), device="cuda", dtype="float32", progress=False).generate(prompt, params)[0].token_ids
    got = LLM(str(quantized), device="cuda", dtype="float32", progress=False).generate(prompt, params)[0].token_ids
    assert got == want


@pytest.mark.parametrize("bits,group_size,zeros,offset", [(4, 128, True, 0), (4, 64, False, 0), (8, 128, True, 1),
                                                          (4, 0, True, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_int_weight_matmul_is_the_reference(bits, group_size, zeros, offset, dtype):
    """The Triton kernel reading the packed words (compiled on CUDA, Triton's interpreter here)
    against the reference: dequantize in float32, round to the activations' dtype, multiply."""
    pytest.importorskip("triton")
    from qwenkit.kernels.cuda.w4a16 import int_weight_matmul

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(bits + group_size)
    k, n, per_word = 256, 96, 32 // bits
    groups = k // group_size if group_size else 1
    fmt = pq.StoredFormat(pq.INT, "gptq", bits=bits, group_size=group_size, zero_point=zeros, zero_offset=offset)
    qweight = pq.pack_int32(torch.randint(0, 1 << bits, (k, n), generator=g), bits, 0)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.001).half()
    qzeros = None
    if zeros:
        qzeros = pq.pack_int32(torch.randint(0, (1 << bits) - offset, (groups, n), generator=g), bits, -1)
    w = pq.dequantize_int(qweight, scales, qzeros, None, fmt).to(dtype)
    for m in (1, 5, 33):
        x = torch.randn(m, k, generator=g).to(dtype)
        want = torch.nn.functional.linear(x.float(), w.float())
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        got = int_weight_matmul(to(x), to(qweight), to(scales), to(qzeros), bits=bits, group_size=group_size,
                                zero_offset=offset).cpu()
        assert got.dtype == dtype
        terms = x.float().abs() @ w.float().abs().t()
        bound = 1e-5 if dtype == torch.float32 else 2**-10  # float16 output rounding
        assert ((got.float() - want).abs() <= bound * terms + 1e-6).all()


@pytest.mark.parametrize("method", ["awq", "fp8"])
def test_stored_layers_take_the_triton_kernels_where_they_apply(monkeypatch, sources, tmp_path, method):
    """The dispatch: a linear and an MoE layer, AWQ or FP8, on a device where the Triton kernels run
    (forced here on the CPU, under the interpreter) compute what the reference computes."""
    pytest.importorskip("triton")
    from qwenkit.kernels import cuda

    source, tensors = sources["qwen3_moe"]
    model = _load(_quantize(tmp_path, source, tensors, method)[0]).model
    layer = model.model.layers[0]
    x = torch.randn(5, 128)
    ids, weights = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]]), torch.full((5, 2), 0.5)
    want = layer.self_attn.qkv_proj(x), layer.mlp.experts(x, ids, weights)
    calls = []
    monkeypatch.setattr(cuda, "applies", lambda t: calls.append(t.shape) or True)
    got = layer.self_attn.qkv_proj(x), layer.mlp.experts(x, ids, weights)
    assert calls
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_fp8_weight_matmul_is_the_reference(dtype):
    """The Triton FP8 kernel (every e4m3 bit pattern but NaN, blocks of 128 with a partial last
    row and column block) against `dequantize_fp8` and a matmul in the activations' dtype."""
    pytest.importorskip("triton")
    from qwenkit.kernels.cuda.fp8 import fp8_weight_matmul

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    n, k = 200, 320
    codes = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int32)
    codes[(codes & 0x7F) == 0x7F] = 0x11  # no NaN
    weight = codes.to(torch.uint8).view(torch.float8_e4m3fn)
    row_block = torch.arange(n) // 128
    scale = torch.rand(2, 3, generator=g) * 0.01
    w = pq.dequantize_fp8(weight, scale, row_block, 128).to(dtype)
    assert torch.equal(pq.dequantize_fp8(weight, scale, row_block, 128), weight.float() * scale.repeat_interleave(
        128, 0)[:n].repeat_interleave(128, 1)[:, :k])
    for m in (1, 7, 40):
        x = torch.randn(m, k, generator=g).to(dtype)
        want = torch.nn.functional.linear(x.float(), w.float())
        got = fp8_weight_matmul(x.to(device), weight.to(device), scale.to(device), row_block.to(device), 128).cpu()
        terms = x.float().abs() @ w.float().abs().t()
        bound = 1e-5 if dtype == torch.float32 else 2**-10
        assert ((got.float() - want).abs() <= bound * terms + 1e-6).all()
