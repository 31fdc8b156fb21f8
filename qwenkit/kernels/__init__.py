"""Kernels: which implementation of each operation runs where (see qwenkit/kernels/cuda for CUDA)."""
