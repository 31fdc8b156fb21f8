"""More than one device for one model replica: tensor and expert parallelism over
torch.distributed (NCCL on CUDA, gloo on CPU). See docs/scale.md."""

from qwenkit.distributed.parallel import ParallelConfig, TensorParallel

__all__ = ["ParallelConfig", "TensorParallel"]
