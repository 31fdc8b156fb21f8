/* RMSNorm and NEOX rotary embedding on float32 rows. At decode a step's tensors are a few
   thousand floats, where torch's composite ops cost more in dispatch than in arithmetic. */
#include <math.h>

#include "kernels.h"

/* y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, rows of H floats; x rows `x_stride` apart. */
void rms_norm_f32(const float *x, int64_t x_stride, const float *w, float *y, int T, int H, float eps) {
#pragma omp parallel for if (T >= 16) schedule(dynamic, qk_chunk(T))
    for (int t = 0; t < T; t++) {
        const float *xt = x + t * x_stride;
        float *yt = y + (int64_t)t * H;
        double sum = 0.0;
        for (int i = 0; i < H; i++) sum += (double)xt[i] * xt[i];
        const float inv = 1.f / sqrtf((float)(sum / H) + eps);
        for (int i = 0; i < H; i++) yt[i] = (xt[i] * inv) * w[i];
    }
}

/* SwiGLU's activation: out[t] = silu(gate[t]) * up[t], x rows [gate (I floats), up (I floats)]. The
   module path and the fused decode step both call this, so a token's numbers do not depend on
   which of them computed it. */
void silu_and_mul_f32(const float *x, float *out, int T, int I) {
#pragma omp parallel for if (T >= 16) schedule(dynamic, qk_chunk(T))
    for (int t = 0; t < T; t++) {
        const float *g = x + (int64_t)t * 2 * I, *u = g + I;
        float *o = out + (int64_t)t * I;
        int i = 0;
#ifdef QK_AVX2
        /* silu(g) = g sigmoid(g), the sigmoid from z = e^-|g| (no overflow): 1 / (1 + z) for g >= 0,
           z / (1 + z) below */
        for (; i + 8 <= I; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i);
            const __m256 z = exp8_nonpositive(_mm256_or_ps(gv, _mm256_set1_ps(-0.f))); /* -|g| */
            const __m256 sigmoid = _mm256_div_ps(_mm256_blendv_ps(_mm256_set1_ps(1.f), z, gv),
                                                 _mm256_add_ps(_mm256_set1_ps(1.f), z));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid), _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < I; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

/* out[t, h] = x[t, h] * cos[t] + rotate_half(x[t, h]) * sin[t], with rotate_half(x) = (-x[D/2:],
   x[:D/2]). x: [T, heads, D] with token stride x_stride (heads D apart); cos, sin: [T, D]; out:
   [T, heads, D] contiguous. */
void rope_neox_f32(const float *x, int64_t x_stride, const float *cos, const float *sin, float *out, int T,
                   int heads, int D) {
    const int half = D / 2;
#pragma omp parallel for if (T >= 16) schedule(dynamic, qk_chunk(T))
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

/* ---- The same ops on bfloat16 / float16 rows (dtype KV_BF16 / KV_F16: the model's dtype) ----

   A 16-bit model's prefill runs these where the float32 kernels above do not apply: each value is
   widened to float32, computed there, and rounded back to nearest even exactly as torch's .to()
   rounds (f32_to_bf16: subnormals kept, NaN quiet), at the points where the torch code they
   replace rounds: RMSNorm casts the normalised row before the weight multiplies it (as
   transformers), rotary rounds x * cos, rotate_half(x) * sin and their sum, SwiGLU rounds silu(gate)
   before the product. So a row's numbers are torch's up to float32 summation order and the exp
   approximation (a value one 16-bit step apart at the rare near-tie; tests/test_kernels.py).

   Not vcvtneps2bf16 (AVX512-BF16) for the rounding: it flushes subnormal inputs to zero where
   torch keeps them, and these loops are bound by memory, not by the five integer operations that
   round a vector (kv_store rounds the same way). */

/* One 16-bit value widened, and a float32 rounded to dtype. */
static inline float load_h(const uint16_t *p, int dtype) { return dtype == KV_BF16 ? bf16_to_f32(*p) : f16_to_f32(*p); }
static inline uint16_t to_h(float v, int dtype) { return dtype == KV_BF16 ? f32_to_bf16(v) : f32_to_f16(v); }
/* v rounded to dtype, kept as the float32 it widens back to. */
static inline float round_h(float v, int dtype) {
    return dtype == KV_BF16 ? bf16_to_f32(f32_to_bf16(v)) : f16_to_f32(f32_to_f16(v));
}

/* The vector of the build: 16 float32 lanes with AVX-512, 8 with AVX2 (QK_VL), none in the plain C
   build. Every loop below is written once over it, with a scalar tail. */
#if defined(QK_AVX512)
#define QK_VL 16
typedef __m512 vf;
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vfmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vloadf(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstoref(float *p, vf v) { _mm512_storeu_ps(p, v); }
static inline float vsum(vf v) {
    return hsum(_mm256_add_ps(_mm512_castps512_ps256(v),
                              _mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(v), 1))));
}
static inline vf vload_h(const uint16_t *p, int dtype) {
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    if (dtype == KV_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}
/* f32_to_bf16 in every lane, the result in the low half of each 32-bit lane. */
static inline __m512i bf16_bits(vf v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan =
        _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
}
static inline void vstore_h(uint16_t *p, int dtype, vf v) {
    const __m256i h =
        dtype == KV_BF16 ? _mm512_cvtepi32_epi16(bf16_bits(v)) : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    _mm256_storeu_si256((__m256i *)p, h);
}
static inline vf vround_h(vf v, int dtype) {
    if (dtype == KV_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16));
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
/* g sigmoid(g), the sigmoid from z = e^-|g| as silu_and_mul_f32's: 1 / (1 + z) for g >= 0, z / (1 + z)
   below; e^x (x <= 0) as exp8_nonpositive, the power of two by vscalefps. */
static inline vf vsilu(vf g) {
    __m512 x = _mm512_or_ps(g, _mm512_set1_ps(-0.f));
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    const __m512 z = _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
    const __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 one = _mm512_set1_ps(1.f);
    return _mm512_mul_ps(g, _mm512_div_ps(_mm512_mask_blend_ps(negative, one, z), _mm512_add_ps(one, z)));
}
#elif defined(QK_AVX2)
#define QK_VL 8
typedef __m256 vf;
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vfmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vloadf(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstoref(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline float vsum(vf v) { return hsum(v); }
static inline vf vload_h(const uint16_t *p, int dtype) {
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (dtype == KV_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}
static inline __m256i bf16_bits(vf v) { /* as kv_store's */
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan =
        _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
}
static inline void vstore_h(uint16_t *p, int dtype, vf v) {
    __m128i h;
    if (dtype == KV_BF16) {
        const __m256i r = bf16_bits(v);
        h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
    } else {
        h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    }
    _mm_storeu_si128((__m128i *)p, h);
}
static inline vf vround_h(vf v, int dtype) {
    if (dtype == KV_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16));
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
static inline vf vsilu(vf g) { /* as silu_and_mul_f32's */
    const __m256 z = exp8_nonpositive(_mm256_or_ps(g, _mm256_set1_ps(-0.f)));
    const __m256 one = _mm256_set1_ps(1.f);
    return _mm256_mul_ps(g, _mm256_div_ps(_mm256_blendv_ps(one, z, g), _mm256_add_ps(one, z)));
}
#else
#define QK_VL 0
#endif

/* The sum of the squares of n 16-bit values. */
static inline float sum_squares_h(const uint16_t *x, int n, int dtype) {
    int i = 0;
    float sum = 0.f;
#if QK_VL
    vf acc = vset1(0.f);
    for (; i + QK_VL <= n; i += QK_VL) {
        const vf v = vload_h(x + i, dtype);
        acc = vfmadd(v, v, acc);
    }
    sum = vsum(acc);
#endif
    for (; i < n; i++) sum += load_h(x + i, dtype) * load_h(x + i, dtype);
    return sum;
}

/* y = w * (x * inv rounded to dtype), rounded: RMSNorm's second half (n values). */
static inline void norm_apply_h(const uint16_t *x, const uint16_t *w, uint16_t *y, int n, float inv, int dtype) {
    int i = 0;
#if QK_VL
    for (; i + QK_VL <= n; i += QK_VL)
        vstore_h(y + i, dtype, vmul(vload_h(w + i, dtype), vround_h(vmul(vload_h(x + i, dtype), vset1(inv)), dtype)));
#endif
    for (; i < n; i++) y[i] = to_h(load_h(w + i, dtype) * round_h(load_h(x + i, dtype) * inv, dtype), dtype);
}

static inline float inverse_rms(float sum_squares, int n, float eps) { return 1.f / sqrtf(sum_squares / n + eps); }

/* rms_norm_f32 on 16-bit rows: y[t] = RMSNorm(x[t]) * w, rows of H values `x_stride` apart. */
void rms_norm_16bit(const uint16_t *x, int64_t x_stride, const uint16_t *w, uint16_t *y, int T, int H, float eps,
                    int dtype) {
#pragma omp parallel for if (T >= 16) schedule(dynamic, qk_chunk(T))
    for (int t = 0; t < T; t++) {
        const uint16_t *xt = x + t * x_stride;
        norm_apply_h(xt, w, y + (int64_t)t * H, H, inverse_rms(sum_squares_h(xt, H, dtype), H, eps), dtype);
    }
}

/* The residual add fused into the next norm, on contiguous [T, H] 16-bit rows: sum = x + residual
   (rounded, as torch's add), y = RMSNorm(sum) * w. */
void add_rms_norm_16bit(const uint16_t *x, const uint16_t *residual, const uint16_t *w, uint16_t *y, uint16_t *sum,
                        int T, int H, float eps, int dtype) {
#pragma omp parallel for if (T >= 16) schedule(dynamic, qk_chunk(T))
    for (int t = 0; t < T; t++) {
        const int64_t row = (int64_t)t * H;
        const uint16_t *xt = x + row, *rt = residual + row;
        uint16_t *st = sum + row;
        float squares = 0.f;
        int i = 0;
#if QK_VL
        vf acc = vset1(0.f);
        for (; i + QK_VL <= H; i += QK_VL) {
            const vf s = vround_h(vadd(vload_h(xt + i, dtype), vload_h(rt + i, dtype)), dtype);
            vstore_h(st + i, dtype, s);
            acc = vfmadd(s, s, acc);
        }
        squares = vsum(acc);
#endif
        for (; i < H; i++) {
            const float s = round_h(load_h(xt + i, dtype) + load_h(rt + i, dtype), dtype);
            st[i] = to_h(s, dtype);
            squares += s * s;
        }
        norm_apply_h(st, w, y + row, H, inverse_rms(squares, H, eps), dtype);
    }
}

/* silu_and_mul_f32 on 16-bit rows: out[t] = silu(gate[t]) (rounded) * up[t], rounded. */
void silu_and_mul_16bit(const uint16_t *x, uint16_t *out, int T, int I, int dtype) {
#pragma omp parallel for if (T >= 16) schedule(dynamic, qk_chunk(T))
    for (int t = 0; t < T; t++) {
        const uint16_t *g = x + (int64_t)t * 2 * I, *u = g + I;
        uint16_t *o = out + (int64_t)t * I;
        int i = 0;
#if QK_VL
        for (; i + QK_VL <= I; i += QK_VL)
            vstore_h(o + i, dtype, vmul(vround_h(vsilu(vload_h(g + i, dtype)), dtype), vload_h(u + i, dtype)));
#endif
        for (; i < I; i++) {
            const float gi = load_h(g + i, dtype);
            o[i] = to_h(round_h(gi / (1.f + expf(-gi)), dtype) * load_h(u + i, dtype), dtype);
        }
    }
}

/* One head of D 16-bit values into out as float32: Qwen3's per-head RMSNorm by w (NULL: none, the
   values as they are), then the NEOX rotation by cos / sin, each step rounded to dtype as torch's
   ops round (out holds values of dtype); normed: D floats of scratch. */
static inline void norm_rope_head_h(const uint16_t *x, const uint16_t *w, const uint16_t *cos, const uint16_t *sin,
                                    float *normed, float *out, int D, float eps, int dtype) {
    const float inv = w ? inverse_rms(sum_squares_h(x, D, dtype), D, eps) : 0.f;
    int i = 0;
#if QK_VL
    for (; i + QK_VL <= D; i += QK_VL) {
        vf v = vload_h(x + i, dtype);
        if (w) v = vround_h(vmul(vload_h(w + i, dtype), vround_h(vmul(v, vset1(inv)), dtype)), dtype);
        vstoref(normed + i, v);
    }
#endif
    for (; i < D; i++) {
        const float v = load_h(x + i, dtype);
        normed[i] = w ? round_h(load_h(w + i, dtype) * round_h(v * inv, dtype), dtype) : v;
    }
    const int half = D / 2;
    i = 0;
#if QK_VL
    for (; i + QK_VL <= half; i += QK_VL) { /* out = x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1) */
        const vf x1 = vloadf(normed + i), x2 = vloadf(normed + half + i);
        const vf lo = vsub(vround_h(vmul(x1, vload_h(cos + i, dtype)), dtype),
                           vround_h(vmul(x2, vload_h(sin + i, dtype)), dtype));
        const vf hi = vadd(vround_h(vmul(x2, vload_h(cos + half + i, dtype)), dtype),
                           vround_h(vmul(x1, vload_h(sin + half + i, dtype)), dtype));
        vstoref(out + i, vround_h(lo, dtype));
        vstoref(out + half + i, vround_h(hi, dtype));
    }
#endif
    for (; i < half; i++) {
        const float x1 = normed[i], x2 = normed[half + i];
        out[i] = round_h(round_h(x1 * load_h(cos + i, dtype), dtype) - round_h(x2 * load_h(sin + i, dtype), dtype),
                         dtype);
        out[half + i] = round_h(round_h(x2 * load_h(cos + half + i, dtype), dtype) +
                                    round_h(x1 * load_h(sin + half + i, dtype), dtype), dtype);
    }
}

/* The attention prologue of a 16-bit model: qkv [T, (H + 2 KVH) D] (rows qkv_stride apart) split
   into q, k, v heads; q and k normed per head (q_norm, k_norm [D]; NULL: no norm) and rotated (cos,
   sin [T, D]); q into q_out [T, H, D]; k and v into cache rows slots[t] ([num_slots, KVH, D] of
   kv_dtype, converted from dtype as torch's .to() does). Returns -1 where a slot is outside the
   cache (then nothing is written), -2 where D is odd or over QK_MAX_HEAD_DIM, else 0. */
#define QK_MAX_HEAD_DIM 1024
int qk_norm_rope_cache_16bit(const uint16_t *qkv, int64_t qkv_stride, const uint16_t *cos, const uint16_t *sin,
                             const uint16_t *q_norm, const uint16_t *k_norm, float eps, uint16_t *q_out,
                             void *k_cache, void *v_cache, int kv_dtype, const int64_t *slots, int64_t num_slots,
                             int T, int H, int KVH, int D, int dtype) {
    if (D % 2 || D > QK_MAX_HEAD_DIM) return -2;
    for (int t = 0; t < T; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return -1;
#pragma omp parallel for if (T >= 16) schedule(dynamic, qk_chunk(T))
    for (int t = 0; t < T; t++) {
        float normed[QK_MAX_HEAD_DIM], out[QK_MAX_HEAD_DIM];
        const uint16_t *row = qkv + t * qkv_stride, *c = cos + (int64_t)t * D, *s = sin + (int64_t)t * D;
        for (int h = 0; h < H; h++) {
            norm_rope_head_h(row + (int64_t)h * D, q_norm, c, s, normed, out, D, eps, dtype);
            uint16_t *q = q_out + ((int64_t)t * H + h) * D;
            int i = 0;
#if QK_VL
            for (; i + QK_VL <= D; i += QK_VL) vstore_h(q + i, dtype, vloadf(out + i));
#endif
            for (; i < D; i++) q[i] = to_h(out[i], dtype);
        }
        const int64_t cache_row = slots[t] * KVH * D;
        for (int h = 0; h < KVH; h++) {
            const uint16_t *k = row + (int64_t)(H + h) * D, *v = row + (int64_t)(H + KVH + h) * D;
            norm_rope_head_h(k, k_norm, c, s, normed, out, D, eps, dtype);
            kv_store(k_cache, cache_row + (int64_t)h * D, kv_dtype, out, D);
            if (kv_dtype == dtype) {
                memcpy((uint16_t *)v_cache + cache_row + (int64_t)h * D, v, sizeof(uint16_t) * D);
            } else {
                int i = 0;
#if QK_VL
                for (; i + QK_VL <= D; i += QK_VL) vstoref(out + i, vload_h(v + i, dtype));
#endif
                for (; i < D; i++) out[i] = load_h(v + i, dtype);
                kv_store(v_cache, cache_row + (int64_t)h * D, kv_dtype, out, D);
            }
        }
    }
    return 0;
}
