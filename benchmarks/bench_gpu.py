"""qwenkit on a GPU against transformers on the same random weights (issue #13).

Builds models with the published shapes of Qwen3-0.6B, Qwen3-8B and Qwen3-30B-A3B (cut to
4 of its 48 layers) in memory, random weights in bfloat16 (transformers' own init, on the
GPU; no checkpoint is written: 16 GB of safetensors would take longer to write and read
back than the whole benchmark), loads the same tensors into qwenkit through its weight
loader, and measures, in one process:

- the card's copy bandwidth (bytes read + written per second, a 2 GiB copy), and each
  model's single-stream limit: that bandwidth over the bytes a decode step must read
  (every weight but the embedding table; the tied lm_head reads it; 8 of 128 experts);
- steady decode tokens/s at batch 1, 8, 32 and 128 through qwenkit's engine (scheduler,
  CUDA graphs, sampling, detokenization: what a user's request goes through), 128-token
  prompts, and transformers' eager model with its KV cache (sdpa) at 1 and 32;
- prefill of a 2,048-token prompt (qwenkit's engine and transformers' forward);
- where a qwenkit decode step's time goes on the host (schedule, launch, wait+sample,
  postprocess) at the largest batch.

    python benchmarks/bench_gpu.py [--models qwen3-0.6b,qwen3-8b,qwen3-30b-a3b-4l] [--json out.json]
    python benchmarks/bench_gpu.py --cpu     # tiny shapes on the CPU: checks the script runs

Prompts are token ids; the tokenizer (for detokenization) is `--tokenizer DIR`, else the
default model's if installed, else a synthetic one with the full vocabulary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwenkit.config import GenerationConfig, ModelConfig  # noqa: E402
from qwenkit.engine.llm_engine import EngineArgs, LLMEngine  # noqa: E402
from qwenkit.loader.weights import load_weights  # noqa: E402
from qwenkit.models import MODEL_REGISTRY  # noqa: E402
from qwenkit.sampling import SamplingParams  # noqa: E402
from qwenkit.tokenizer import Tokenizer  # noqa: E402

_QWEN3 = dict(vocab_size=151936, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
              max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6, bos_token_id=None,
              eos_token_id=None)
SHAPES = {
    "qwen3-0.6b": ("qwen3", dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, tie_word_embeddings=True)),
    "qwen3-8b": ("qwen3", dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               tie_word_embeddings=False)),
    "qwen3-30b-a3b-4l": ("qwen3_moe", dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=4,
                                           num_key_value_heads=4, moe_intermediate_size=768, num_experts=128,
                                           num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                                           mlp_only_layers=[], tie_word_embeddings=False)),
    # --cpu: the same architectures, tiny.
    "tiny-qwen3": ("qwen3", dict(_QWEN3, vocab_size=4096, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                 tie_word_embeddings=True)),
    "tiny-qwen3-moe": ("qwen3_moe", dict(_QWEN3, vocab_size=4096, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=32, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                         norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                                         tie_word_embeddings=False)),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a device-to-device copy of 2 GiB (best of 10)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * (2 << 30) / best


def build(name: str, device: torch.device, dtype: torch.dtype):
    """(transformers model, qwenkit model) with the same random weights."""
    import transformers

    arch, shape = SHAPES[name]
    config_class = {"qwen3": transformers.Qwen3Config, "qwen3_moe": transformers.Qwen3MoeConfig}[arch]
    shape = dict(shape)
    rope = {"rope_type": "default", "rope_theta": shape.pop("rope_theta")}
    hf_config = config_class(**shape, rope_parameters=rope)
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa").eval()
    config = ModelConfig.from_hf(hf_config.to_dict())
    with torch.device(device):
        ours = MODEL_REGISTRY[config.model_type](config, dtype=dtype)
    load_weights(ours, ((k, v) for k, v in hf.state_dict().items()))
    return hf, ours.eval()


def weight_bytes_per_step(model) -> int:
    """Bytes one single-stream decode step reads: every weight but the embedding table
    (one row of it), the tied lm_head reading it whole; top_k of the experts."""
    c = model.config
    total = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if name.endswith("embed_tokens.weight") and not c.tie_word_embeddings:
            continue
        if ".experts." in name:
            size = size * c.num_experts_per_tok // c.num_experts
        total += size
    return total


def tokenizer(path: str | None, vocab_size: int) -> Tokenizer:
    if path:
        return Tokenizer.from_dir(path)
    try:
        from qwenkit.default_model import default_model_path
        from qwenkit.loader.gguf import GGUFCheckpoint

        ckpt = GGUFCheckpoint(default_model_path(progress=False))
        return Tokenizer(ckpt.tokenizer_backend(), chat_template=ckpt.chat_template, **ckpt.special_tokens())
    except Exception:  # no default model: a word-level vocabulary of the right size
        import tokenizers

        vocab = {f"t{i}": i for i in range(vocab_size)}
        backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
        return Tokenizer(backend, chat_template=None, bos_token=None, eos_token=None, pad_token=None)


def prompt(length: int, salt: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(salt)
    return torch.randint(100, min(vocab, 150000), (length,), generator=g).tolist()


class StepTimer:
    """Host time of a step's parts, by wrapping the engine's methods."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.totals = {"schedule": 0.0, "run (launch)": 0.0, "sample (incl. GPU wait)": 0.0, "postprocess": 0.0}

    def __enter__(self):
        e = self.engine
        self._saved = (e.scheduler.schedule, e.runner.run, e.sampler.__call__, e._append)
        e.scheduler.schedule = self._timed("schedule", e.scheduler.schedule)
        e.runner.run = self._timed("run (launch)", e.runner.run)
        sampler = e.sampler
        timed_sample = self._timed("sample (incl. GPU wait)", sampler.__call__)

        class Timed:
            def __call__(self, *a, **k):
                return timed_sample(*a, **k)

        e.sampler = Timed()
        e._append = self._timed("postprocess", e._append)
        return self

    def __exit__(self, *exc):
        e = self.engine
        e.scheduler.schedule, e.runner.run, _, e._append = self._saved
        del e.__dict__["_append"]
        e.sampler = self._saved[2].__self__

    def _timed(self, key, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.totals[key] += time.perf_counter() - t
        return wrapper


def qwenkit_decode(engine: LLMEngine, batch: int, steps: int, vocab: int, *, profile: bool = False) -> dict:
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    ids = [f"d{batch}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        engine.add_request(rid, prompt(128, 1000 * batch + i, vocab), params)
    started: set[str] = set()
    while len(started) < batch:
        started.update(u.request_id for u in engine.step())
    for _ in range(3):
        engine.step()
    timer = StepTimer(engine) if profile else None
    if timer:
        timer.__enter__()
    generated = 0
    t = time.perf_counter()
    for _ in range(steps):
        generated += sum(len(u.outputs) for u in engine.step())
    elapsed = time.perf_counter() - t
    if timer:
        timer.__exit__(None, None, None)
    for rid in ids:
        engine.abort(rid)
    out = {"batch": batch, "tok_s": generated / elapsed, "step_ms": 1e3 * elapsed / steps}
    if timer:
        out["host_ms_per_step"] = {k: round(1e3 * v / steps, 3) for k, v in timer.totals.items()}
    return out


def qwenkit_prefill(engine: LLMEngine, length: int, vocab: int, repeats: int = 3) -> float:
    times = []
    for r in range(repeats + 1):
        engine.add_request(f"p{r}", prompt(length, 7 + r, vocab), SamplingParams(temperature=0, max_tokens=1))
        t = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        times.append(time.perf_counter() - t)
    return length / statistics.median(times[1:])


@torch.inference_mode()
def hf_decode(hf, batch: int, steps: int, vocab: int, device: torch.device) -> dict:
    ids = torch.tensor([prompt(128, 5000 + i, vocab) for i in range(batch)], device=device)
    out = hf(ids, use_cache=True, logits_to_keep=1)
    past, token = out.past_key_values, out.logits[:, -1].argmax(-1)
    for _ in range(3):
        out = hf(token[:, None], past_key_values=past, use_cache=True)
        token = out.logits[:, -1].argmax(-1)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        out = hf(token[:, None], past_key_values=past, use_cache=True)
        token = out.logits[:, -1].argmax(-1)
        token.tolist()  # as generate() reads each step's tokens
    elapsed = time.perf_counter() - t
    return {"batch": batch, "tok_s": batch * steps / elapsed, "step_ms": 1e3 * elapsed / steps}


@torch.inference_mode()
def hf_prefill(hf, length: int, vocab: int, device: torch.device, repeats: int = 3) -> float:
    times = []
    for r in range(repeats + 1):
        ids = torch.tensor([prompt(length, 7 + r, vocab)], device=device)
        sync(device)
        t = time.perf_counter()
        hf(ids, logits_to_keep=1).logits.argmax(-1).tolist()
        times.append(time.perf_counter() - t)
    return length / statistics.median(times[1:])


def bench_model(name: str, args, device: torch.device, bandwidth: float) -> dict:
    dtype = torch.bfloat16
    t = time.perf_counter()
    hf, model = build(name, device, dtype)
    vocab = model.config.vocab_size
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    engine_args = EngineArgs(max_model_len=4096, max_num_seqs=max(args.batches), kv_cache_memory=args.kv_cache_memory,
                             enforce_eager=args.enforce_eager)
    engine = LLMEngine(model, tokenizer(args.tokenizer, vocab), GenerationConfig(eos_token_ids=()), device=device,
                       args=engine_args)
    start_s = time.perf_counter() - t
    step_bytes = weight_bytes_per_step(model)
    limit = bandwidth / step_bytes
    result = {"model": name, "build_s": round(build_s, 1), "engine_start_s": round(start_s, 1),
              "weight_bytes_per_step": step_bytes, "single_stream_limit_tok_s": limit, "decode": [], "hf_decode": []}
    for b in args.batches:
        r = qwenkit_decode(engine, b, args.steps, vocab, profile=b == max(args.batches))
        r["fraction_of_limit"] = r["tok_s"] / limit if b == 1 else None
        result["decode"].append(r)
        print(f"  {name}: qwenkit decode batch {b}: {r['tok_s']:.1f} tok/s ({r['step_ms']:.2f} ms/step)"
              + (f", host ms/step {r['host_ms_per_step']}" if "host_ms_per_step" in r else ""), flush=True)
    result["prefill_tok_s"] = qwenkit_prefill(engine, args.prefill, vocab)
    print(f"  {name}: qwenkit prefill {args.prefill}: {result['prefill_tok_s']:.0f} tok/s", flush=True)
    del engine
    if not args.no_hf:
        for b in args.hf_batches:
            r = hf_decode(hf, b, min(args.steps, 32), vocab, device)
            result["hf_decode"].append(r)
            print(f"  {name}: transformers decode batch {b}: {r['tok_s']:.1f} tok/s", flush=True)
        result["hf_prefill_tok_s"] = hf_prefill(hf, args.prefill, vocab, device)
        print(f"  {name}: transformers prefill {args.prefill}: {result['hf_prefill_tok_s']:.0f} tok/s", flush=True)
    del hf, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def markdown(results: list[dict], bandwidth: float) -> str:
    lines = [f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + written)", "",
             "| model | limit bs 1 | bs 1 | " + " | ".join(f"bs {d['batch']}" for d in results[0]["decode"][1:])
             + " | prefill | transformers bs 1 / 32 | transformers prefill |",
             "|---" * (5 + len(results[0]["decode"])) + "|"]
    for r in results:
        d1 = r["decode"][0]
        hf = " / ".join(f"{h['tok_s']:.0f}" for h in r["hf_decode"]) or "-"
        lines.append(
            f"| {r['model']} | {r['single_stream_limit_tok_s']:.0f} | {d1['tok_s']:.0f} ({d1['fraction_of_limit']:.0%}) | "
            + " | ".join(f"{d['tok_s']:.0f}" for d in r["decode"][1:])
            + f" | {r['prefill_tok_s']:.0f} | {hf} | {r.get('hf_prefill_tok_s', float('nan')):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-0.6b,qwen3-8b,qwen3-30b-a3b-4l")
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--hf-batches", default="1,32")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per batch size")
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--kv-cache-memory", default="16GiB")
    p.add_argument("--tokenizer", help="a tokenizer folder (tokenizer.json) for detokenization")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU: checks that the script runs")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.cpu:
        device = torch.device("cpu")
        args.models, args.batches, args.hf_batches = "tiny-qwen3,tiny-qwen3-moe", "1,4", "1"
        args.steps, args.prefill, args.kv_cache_memory = 4, 64, "64MiB"
    else:
        device = torch.device("cuda")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.hf_batches = [int(b) for b in args.hf_batches.split(",")]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {card}; torch {torch.__version__}", flush=True)
    bandwidth = copy_bandwidth(device)
    results = [bench_model(name, args, device, bandwidth) for name in args.models.split(",")]
    print(markdown(results, bandwidth))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": card, "torch": torch.__version__,
                                               "copy_bandwidth": bandwidth, "results": results}, indent=1))


if __name__ == "__main__":
    main()
