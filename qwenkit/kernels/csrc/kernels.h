/* What qwenkit's CPU kernels share: the functions one source file calls in another, small
   inline helpers, and the instruction set of this build. Every .c file here is compiled into
   one library per ISA variant (qwenkit/kernels/build.py); the variant's -march flags decide
   which of QK_AVX2 / QK_AVX512 / QK_AMX are defined, and each kernel takes the widest path
   it has for them. QK_NO_SIMD builds the plain C paths only (the "generic" variant). */
#ifndef QWENKIT_KERNELS_H
#define QWENKIT_KERNELS_H

#include <stdint.h>
#include <string.h>

#if (defined(__AVX2__) || defined(__F16C__)) && !defined(QK_NO_SIMD)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(QK_NO_SIMD)
#define QK_AVX2 1
#endif

#define QK 32 /* activation block: one float scale per 32 int8 values */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__) && !defined(QK_NO_SIMD)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        const float f = (float)mant * (1.f / 16777216.f); /* zero or subnormal: mant * 2^-24 */
        return sign ? -f : f;
    }
    bits = exp == 31 ? sign | 0x7f800000u | (mant << 13) : sign | ((exp + 112) << 23) | (mant << 13);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

#ifdef QK_AVX2
static inline float hsum(__m256 v) { /* the sum of the 8 lanes */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* norm_rope.c */
void rms_norm_f32(const float *x, int64_t x_stride, const float *w, float *y, int T, int H, float eps);
void rope_neox_f32(const float *x, int64_t x_stride, const float *cos, const float *sin, float *out, int T,
                   int heads, int D);

/* attention.c */
void paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                                const int32_t *block_tables, const int32_t *context_lens, float *out, int B, int H,
                                int KVH, int D, int block_size, int max_blocks, float scale);

/* quant.c */
int int8_linear_q8(const float *x, const int8_t *w, const uint16_t *scale, float *y, int M, int N, int K);
int q5_0_linear_q8(const float *x, const uint8_t *w, float *y, int M, int N, int K);
void q5_0_dequantize(const uint8_t *w, float *out, int N, int K);

#endif
