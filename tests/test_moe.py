"""The MoE grouped path (tokens sorted by expert, one matmul pair per active expert)
equals a per-token, per-expert reference loop."""

import pytest
import torch
import torch.nn.functional as F

from qwenkit.models.layers import FusedExperts


def reference(x, expert_ids, weights, gate_up_proj, down_proj):
    out = torch.zeros_like(x)
    intermediate = down_proj.shape[2]
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], expert_ids[t].tolist()):
            gate_up = gate_up_proj[e] @ x[t]
            out[t] += w * (down_proj[e] @ (F.silu(gate_up[:intermediate]) * gate_up[intermediate:]))
    return out


@pytest.mark.parametrize("num_tokens", [1, 3, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_per_token_reference(num_tokens, dtype):
    g = torch.Generator().manual_seed(num_tokens)
    num_experts, hidden, intermediate, top_k = 16, 32, 24, 4
    experts = FusedExperts(num_experts, hidden, intermediate, dtype=dtype)
    experts.gate_up_proj.data.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) * 0.2)
    experts.down_proj.data.copy_(torch.randn(experts.down_proj.shape, generator=g) * 0.2)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    # Distinct experts per token, as topk gives; some experts unused, some shared by many tokens.
    expert_ids = torch.stack([torch.randperm(num_experts // 2, generator=g)[:top_k] * 2 for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=g).softmax(-1).to(dtype)
    with torch.inference_mode():
        got = experts(x, expert_ids, weights)
        expected = reference(x.float(), expert_ids, weights.float(), experts.gate_up_proj.float(),
                             experts.down_proj.float())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)
