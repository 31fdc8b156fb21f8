"""This process's place in a tensor-parallel group, passed explicitly to the layers that
shard (no module-global state), and the collectives they call."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelConfig:
    """tensor_parallel_size: processes (devices) one replica's model is split over.
    enable_expert_parallel: Qwen3-MoE experts split whole across the ranks (each rank its
    share of the experts) instead of each expert's matrices split across all ranks."""

    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False

    def __post_init__(self):
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        if self.enable_expert_parallel and self.tensor_parallel_size == 1:
            raise ValueError("enable_expert_parallel needs tensor_parallel_size > 1")


@dataclass(frozen=True, eq=False)
class TensorParallel:
    """Rank `rank` of `size`; `group` is the torch.distributed group of the collectives."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None
    expert_parallel: bool = False

    def split(self, n: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's equal share of n."""
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size ({self.size})")
        length = n // self.size
        return self.rank * length, length

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, in place."""
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x, concatenated along dim in rank order."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)
