"""The int8 weight-only matmul of small batches (decode) on CPU, as a C kernel.

`y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]` with float32 activations, int8 weights and
bfloat16 scales. Each weight is read once per call, widened to float32 in registers and
multiplied into every row of `x`: blocks of 4 weight rows x 2 activation rows, eight
float32 accumulators, AVX2 + FMA where the CPU has them (plain C that the compiler
vectorizes elsewhere); OpenMP over blocks of output rows. Decode streams every weight
once per token, so the kernel's job is to keep up with memory; torch's
`_weight_int8pack_mm` takes bfloat16 activations, which CPUs without AVX-512-BF16
convert in software (docs/quantization.md has the measurements).

Activations stay float32, so the only rounding is the weights' own: more exact than the
bfloat16-activation kernel it replaces.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from qwenkit.models import native

BLOCK = 32  # activation values per int8 scale (QK in the source)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QK_AVX2 1
#endif

#define QK 32  /* activation block: one float scale per 32 int8 values */
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 8
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* x[K] -> xq[K] int8 and xs[ceil(K / QK)]: xs[j] = max |x| over block j / 127 (the last block
   may be short). */
static void quantize_row(const float *x, int K, int8_t *xq, float *xs) {
    for (int j = 0; j * QK < K; j++) {
        const float *b = x + j * QK;
        const int n = K - j * QK < QK ? K - j * QK : QK;
        float amax = 0.f;
        for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(b[i]));
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        xs[j] = amax / 127.f;
        for (int i = 0; i < n; i++) xq[j * QK + i] = (int8_t)lrintf(b[i] * inv);
    }
}

/* sum_j xs[j] * (xq . w over block j), blocks from j0 on, in plain C. */
static float dot_tail(const int8_t *xq, const float *xs, const int8_t *w, int K, int j0) {
    float total = 0.f;
    for (int j = j0; j * QK < K; j++) {
        int32_t dot = 0;
        for (int k = j * QK; k < K && k < (j + 1) * QK; k++) dot += (int32_t)xq[k] * w[k];
        total += xs[j] * (float)dot;
    }
    return total;
}

/* out[m][r] = sum_j xs[m][j] * sum_{k in block j} xq[m][k] * w[r][k], for nr weight rows and mr
   activation rows. Constant nr, mr (the always-inlined 4 x 2 case) keep the accumulators in
   registers. */
static inline __attribute__((always_inline)) void tile(const int8_t *xq, const float *xs, const int8_t *w,
                                                       int K, int nr, int mr, float out[2][4]) {
    const int nb = (K + QK - 1) / QK;  /* scales per activation row */
    int j0 = 0;                         /* the blocks before j0 are done in vector code */
    for (int m = 0; m < 2; m++)
        for (int r = 0; r < 4; r++) out[m][r] = 0.f;
#ifdef QK_AVX2
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2][4];
    for (int m = 0; m < 2; m++)
        for (int r = 0; r < 4; r++) acc[m][r] = _mm256_setzero_ps();
    for (; j0 < K / QK; j0++) {
        for (int r = 0; r < nr; r++) {
            const int8_t *wp = w + (int64_t)r * K + j0 * QK;
            _mm_prefetch((const char *)(wp + PREFETCH_ROWS * (int64_t)K), _MM_HINT_T0);
            const __m256i wv = _mm256_loadu_si256((const __m256i *)wp);
            const __m256i wabs = _mm256_sign_epi8(wv, wv);
            for (int m = 0; m < mr; m++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (int64_t)m * K + j0 * QK));
                /* |w| * (x with w's sign): unsigned x signed bytes, pairs summed into int16
                   (at most 2 * 127 * 127, no saturation), then pairs into int32. */
                const __m256i p16 = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wv));
                const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
                acc[m][r] = _mm256_fmadd_ps(p, _mm256_set1_ps(xs[m * nb + j0]), acc[m][r]);
            }
        }
    }
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < nr; r++) {
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[m][r]), _mm256_extractf128_ps(acc[m][r], 1));
            s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            s = _mm_add_ss(s, _mm_movehdup_ps(s));
            out[m][r] = _mm_cvtss_f32(s);
        }
#endif
    if (j0 * QK < K)
        for (int m = 0; m < mr; m++)
            for (int r = 0; r < nr; r++)
                out[m][r] += dot_tail(xq + (int64_t)m * K, xs + m * nb, w + (int64_t)r * K, K, j0);
}

/* y[m, n] = scale[n] * sum_k x[m, k] * w[n, k], the activations quantized to int8 in blocks of QK.
   x: [M, K] float32, w: [N, K] int8, scale: [N] bfloat16 bits, y: [M, N] float32; all contiguous.
   Returns 0, or -1 when out of memory. */
int int8_linear_q8(const float *x, const int8_t *w, const uint16_t *scale, float *y, int M, int N, int K) {
    const int nb = (K + QK - 1) / QK;
    int8_t *xq = malloc((size_t)M * K);
    float *xs = malloc(sizeof(float) * (size_t)M * nb);
    if (!xq || !xs) { free(xq); free(xs); return -1; }
    #pragma omp parallel for if (M > 8)
    for (int m = 0; m < M; m++) quantize_row(x + (int64_t)m * K, K, xq + (int64_t)m * K, xs + (int64_t)m * nb);
    const int blocks = (N + 3) / 4;
    #pragma omp parallel for schedule(static)
    for (int b = 0; b < blocks; b++) {
        const int n0 = b * 4, nr = N - n0 < 4 ? N - n0 : 4;
        const int8_t *wb = w + (int64_t)n0 * K;
        for (int m0 = 0; m0 < M; m0 += 2) {
            const int mr = M - m0 < 2 ? M - m0 : 2;
            const int8_t *xqm = xq + (int64_t)m0 * K;
            const float *xsm = xs + (int64_t)m0 * nb;
            float out[2][4];
            if (nr == 4 && mr == 2) tile(xqm, xsm, wb, K, 4, 2, out);
            else if (nr == 4) tile(xqm, xsm, wb, K, 4, 1, out);
            else tile(xqm, xsm, wb, K, nr, mr, out);
            for (int m = 0; m < mr; m++)
                for (int r = 0; r < nr; r++)
                    y[(int64_t)(m0 + m) * N + n0 + r] = out[m][r] * bf16_to_f32(scale[n0 + r]);
        }
    }
    free(xq);
    free(xs);
    return 0;
}
"""


@functools.cache
def _kernel():
    lib = native.load_library("int8_linear", _SOURCE)
    if lib is None:
        return None
    fn = lib.int8_linear_q8
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
    return fn


def available() -> bool:
    return _kernel() is not None


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """x [M, K] @ (weight int8 [N, K] * scale bfloat16 [N])^T in float32, or None where the
    kernel does not apply (not CPU, no compiler, kernels turned off)."""
    fn = _kernel()
    if fn is None or x.device.type != "cpu":
        return None
    if weight.dtype != torch.int8 or scale.dtype != torch.bfloat16 or x.shape[-1] != weight.shape[1]:
        raise TypeError("int8_linear takes int8 weights [N, K], bfloat16 scales [N] and x [M, K]")
    x = x.to(torch.float32).contiguous()
    weight, scale = weight.contiguous(), scale.contiguous()
    m, (n, k) = x.shape[0], weight.shape
    y = torch.empty(m, n, dtype=torch.float32)
    if fn(x.data_ptr(), weight.data_ptr(), scale.data_ptr(), y.data_ptr(), m, n, k) != 0:
        raise MemoryError(f"int8_linear: no memory for the quantized activations ({m} x {k})")
    return y


@torch.library.custom_op("qwenkit::int8_linear", mutates_args=())
def int8_linear_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`int8_linear` as an opaque op, for torch.compile (which cannot trace a ctypes call)."""
    y = int8_linear(x, weight, scale)
    if y is None:  # the kernel is not built here: the same product in torch
        y = x.float() @ (weight.float() * scale.float()[:, None]).T
    return y


@int8_linear_op.register_fake
def _(x, weight, scale):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)
