"""RMSNorm and rotary embedding as C kernels, for float32 on CPU.

At decode a step's tensors are a few thousand floats: torch's composite `rms_norm` (a
handful of ops) and the rotary's slice/cat/mul/add cost tens of microseconds a call on
dispatch and thread wake-ups, ~3 ms of a 45 ms step on the default model (measured:
docs/decode.md). One C call each does the same arithmetic. Each function returns None
where it does not apply (not float32 CPU, a layout it does not take, kernels off or not
built); the caller then runs its torch code. Under torch.compile callers use torch code.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from qwenkit.models import native

_SOURCE = r"""
#include <math.h>
#include <stdint.h>

/* y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, rows of H floats; x rows `x_stride` apart. */
void rms_norm_f32(const float *x, int64_t x_stride, const float *w, float *y, int T, int H, float eps) {
    #pragma omp parallel for if (T >= 16)
    for (int t = 0; t < T; t++) {
        const float *xt = x + t * x_stride;
        float *yt = y + (int64_t)t * H;
        double sum = 0.0;
        for (int i = 0; i < H; i++) sum += (double)xt[i] * xt[i];
        const float inv = 1.f / sqrtf((float)(sum / H) + eps);
        for (int i = 0; i < H; i++) yt[i] = (xt[i] * inv) * w[i];
    }
}

/* NEOX rotary: out[t, h] = x[t, h] * cos[t] + rotate_half(x[t, h]) * sin[t], with rotate_half(x)
   = (-x[D/2:], x[:D/2]). x: [T, heads, D] with token stride x_stride (heads D apart); cos, sin:
   [T, D]; out: [T, heads, D] contiguous. */
void rope_neox_f32(const float *x, int64_t x_stride, const float *cos, const float *sin, float *out,
                   int T, int heads, int D) {
    const int half = D / 2;
    #pragma omp parallel for if (T >= 16)
    for (int t = 0; t < T; t++) {
        const float *c = cos + (int64_t)t * D, *s = sin + (int64_t)t * D;
        for (int h = 0; h < heads; h++) {
            const float *xh = x + t * x_stride + (int64_t)h * D;
            float *oh = out + ((int64_t)t * heads + h) * D;
            for (int i = 0; i < half; i++) {
                oh[i] = xh[i] * c[i] - xh[i + half] * s[i];
                oh[i + half] = xh[i + half] * c[i + half] + xh[i] * s[i + half];
            }
        }
    }
}
"""


@functools.cache
def _library():
    lib = native.load_library("cpu_ops", _SOURCE)
    if lib is not None:
        lib.rms_norm_f32.restype = None
        lib.rms_norm_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_int, ctypes.c_int, ctypes.c_float]
        lib.rope_neox_f32.restype = None
        lib.rope_neox_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return lib


def _applies(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x [T, H] (rows may be strided) -> normalised [T, H], or None."""
    if x.dim() != 2 or x.stride(1) != 1 or not weight.is_contiguous() or not _applies(x, weight):
        return None
    lib = _library()
    if lib is None:
        return None
    y = torch.empty(x.shape, dtype=torch.float32)
    lib.rms_norm_f32(x.data_ptr(), x.stride(0), weight.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], eps)
    return y


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x [T, heads, D] (heads contiguous within a token), cos / sin [T, 1, D] -> rotated, or None."""
    if (x.dim() != 3 or x.stride(2) != 1 or x.stride(1) != x.shape[2] or not _applies(x, cos, sin)
            or not (cos.is_contiguous() and sin.is_contiguous()) or x.shape[2] % 2):
        return None
    lib = _library()
    if lib is None:
        return None
    out = torch.empty(x.shape, dtype=torch.float32)
    t, heads, d = x.shape
    lib.rope_neox_f32(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), t, heads, d)
    return out
