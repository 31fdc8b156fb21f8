"""The sparse MoE block against a dense MLP of equal active FLOPs, on a reduced
Qwen3-30B-A3B shape: 128 experts, top-8, hidden 2048, moe_intermediate 768, 2 layers.

    python benchmarks/bench_moe.py [--tokens 1,8,512] [--layers 2] [--repeats 7] [--dtype float32]

The dense MLP has intermediate = top_k * moe_intermediate (6144), so per token both do the
same multiply-adds; at one token both read the same bytes of weights. Each layer has its
own weights (2.4 GB per sparse layer in float32), so nothing stays in cache between
layers. The two are timed alternately in one process (the machine is shared), median of
`repeats`, and the table also gives "grouped" (qwenkit's path) against the per-token
reference loop the test compares with, at 1 and 8 tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qwenkit.config import ModelConfig
from qwenkit.models.layers import MLP, SparseMoeBlock

QWEN3_30B_A3B_REDUCED = dict(
    model_type="qwen3_moe", vocab_size=1024, hidden_size=2048, intermediate_size=6144, num_hidden_layers=2,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
    moe_intermediate_size=768, norm_topk_prob=True,
)


def build(config: ModelConfig, num_layers: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sparse, dense = [], []
    for _ in range(num_layers):
        moe = SparseMoeBlock(config, dtype=dtype)
        mlp = MLP(config.hidden_size, config.num_experts_per_tok * config.moe_intermediate_size, dtype=dtype)
        for module in (moe, mlp):
            for p in module.parameters():
                p.data.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.02)
        sparse.append(moe.eval())
        dense.append(mlp.eval())
    return sparse, dense


def reference_moe(block: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """Per token, per chosen expert: what the grouped path must equal (tests/test_moe.py)."""
    probs = torch.softmax(block.gate(x), dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, block.top_k, dim=-1)
    if block.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    experts = block.experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), ids[t].tolist()):
            gate, up = (x[t : t + 1] @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
            out[t] += (w * (torch.nn.functional.silu(gate) * up) @ experts.down_proj[e].T)[0].to(x.dtype)
    return out


def time_alternating(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run round-robin so that machine load hits all alike."""
    times = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,8,512")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    config = ModelConfig.from_hf(QWEN3_30B_A3B_REDUCED)
    sparse, dense = build(config, args.layers, dtype)
    print(f"threads {torch.get_num_threads()}, dtype {args.dtype}, {args.layers} layers, "
          f"{config.num_experts} experts top-{config.num_experts_per_tok}, hidden {config.hidden_size}, "
          f"moe_intermediate {config.moe_intermediate_size} vs dense intermediate {config.intermediate_size}")
    print(f"{'tokens':>6}  {'active experts':>14}  {'sparse ms':>9}  {'dense ms':>8}  {'sparse/dense':>12}"
          f"  {'reference ms':>12}")
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for num_tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(num_tokens, config.hidden_size, generator=g).to(dtype)

            def run(layers):
                h = x
                for layer in layers:
                    h = layer(h)
                return h

            fns = {"sparse": lambda: run(sparse), "dense": lambda: run(dense)}
            if num_tokens <= 8:
                fns["reference"] = lambda: [reference_moe(layer, x) for layer in sparse]
            t = time_alternating(fns, args.repeats)
            probs = sparse[0].gate(x).softmax(-1)
            active = torch.topk(probs, config.num_experts_per_tok, dim=-1).indices.unique().numel()
            ref = f"{t['reference'] * 1e3:12.1f}" if "reference" in t else f"{'-':>12}"
            print(f"{num_tokens:>6}  {active:>14}  {t['sparse'] * 1e3:9.1f}  {t['dense'] * 1e3:8.1f}  "
                  f"{t['sparse'] / t['dense']:12.2f}  {ref}", flush=True)


if __name__ == "__main__":
    main()
