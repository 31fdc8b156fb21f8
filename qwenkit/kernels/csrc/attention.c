/* Decode attention read in place from the paged KV cache: one query token per sequence, its
   keys and values walked through the block table, each row read once (no gathered copy). One
   OpenMP task per (sequence, kv head): the scores of its G query heads against the context's
   keys, a softmax, then the weighted sum of the values. The cache holds float32, float16 or
   bfloat16 rows (kv_dtype); 16-bit rows are widened to float32 as they are read. */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

#ifdef QK_AVX2
/* 8 cache values from element `index` on, as floats (a 16-bit cache widened in registers). */
static inline __m256 load8(const void *cache, int64_t index, int kv_dtype) {
    if (kv_dtype == KV_F32) return _mm256_loadu_ps((const float *)cache + index);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)cache + index));
    if (kv_dtype == KV_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* scores[g * L + l] = scale * q_g . k for the G query heads, k at cache element `index`; each 8
   values of k are loaded (and widened) once for all G heads. D a multiple of 8. */
static void qk_scores(const float *qb, const void *cache, int64_t index, int kv_dtype, int G, int D, float scale,
                      float *scores, int64_t L, int l) {
    for (int g0 = 0; g0 < G; g0 += 8) {
        const int gn = G - g0 < 8 ? G - g0 : 8;
        __m256 acc[8];
        for (int g = 0; g < gn; g++) acc[g] = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 8) {
            const __m256 k = load8(cache, index + d, kv_dtype);
            for (int g = 0; g < gn; g++)
                acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qb + (int64_t)(g0 + g) * D + d), k, acc[g]);
        }
        for (int g = 0; g < gn; g++) scores[(g0 + g) * L + l] = hsum(acc[g]) * scale;
    }
}

/* out_g += sum_i p_g[i] * v_i over the n value rows of one block (row i at cache element
   first + i * row), for the G heads: the rows are widened once into rows_f32 [n, D] (a float32
   cache is read in place), then each head's output stays in registers, 64 dims at a time, while
   the rows stream from L1. D a multiple of 8. */
static void pv_block(float *ob, const void *cache, int64_t first, int64_t row, int n, int kv_dtype, int G, int D,
                     const float *scores, int64_t L, int l0, float *rows_f32) {
    const float *rows[n];
    for (int i = 0; i < n; i++) {
        if (kv_dtype == KV_F32) {
            rows[i] = (const float *)cache + first + i * row;
            continue;
        }
        float *r = rows_f32 + (int64_t)i * D;
        for (int d = 0; d < D; d += 8) _mm256_storeu_ps(r + d, load8(cache, first + i * row + d, kv_dtype));
        rows[i] = r;
    }
    for (int g = 0; g < G; g++)
        for (int d0 = 0; d0 < D; d0 += 64) {
            const int chunks = (D - d0 < 64 ? D - d0 : 64) / 8;
            float *o = ob + (int64_t)g * D + d0;
            __m256 acc[8];
            for (int c = 0; c < chunks; c++) acc[c] = _mm256_loadu_ps(o + 8 * c);
            for (int i = 0; i < n; i++) {
                const __m256 p = _mm256_set1_ps(scores[g * L + l0 + i]);
                for (int c = 0; c < chunks; c++) acc[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(rows[i] + d0 + 8 * c), acc[c]);
            }
            for (int c = 0; c < chunks; c++) _mm256_storeu_ps(o + 8 * c, acc[c]);
        }
}
#endif

/* q, out: [B, H, D] float32; k_cache, v_cache: [num_slots, KVH, D] of kv_dtype; block_tables:
   [B, max_blocks]; context_lens: [B]. Position l of sequence b is slot
   block_tables[b][l / block_size] * block_size + l % block_size. A sequence of context length 0
   gets zeros. */
void paged_decode_attention_f32(const float *q, const void *k_cache, const void *v_cache,
                                const int32_t *block_tables, const int32_t *context_lens, float *out, int B, int H,
                                int KVH, int D, int block_size, int max_blocks, float scale, int kv_dtype) {
    const int G = H / KVH;
    const int64_t row = (int64_t)KVH * D; /* elements from one slot to the next */
#pragma omp parallel for schedule(dynamic, 1)
    for (int task = 0; task < B * KVH; task++) {
        const int b = task / KVH, kvh = task % KVH, L = context_lens[b];
        const int32_t *table = block_tables + (int64_t)b * max_blocks;
        const float *qb = q + ((int64_t)b * H + kvh * G) * D;
        float *ob = out + ((int64_t)b * H + kvh * G) * D;
        memset(ob, 0, sizeof(float) * G * D);
        if (L <= 0) continue;
        /* [G, L] scores, then one block of value rows widened to float32 (or one row, without AVX2) */
        float *scores = malloc(sizeof(float) * ((size_t)G * L + (size_t)block_size * D));
        float *tmp = scores + (size_t)G * L;
        for (int start = 0; start < L; start += block_size) {
            const int64_t first = (int64_t)table[start / block_size] * block_size * row + kvh * D;
            const int n = L - start < block_size ? L - start : block_size;
            for (int i = 0; i < n; i++) {
#ifdef QK_AVX2
                if (D % 8 == 0) {
                    qk_scores(qb, k_cache, first + i * row, kv_dtype, G, D, scale, scores, L, start + i);
                    continue;
                }
#endif
                const float *k = kv_row(k_cache, first + i * row, kv_dtype, D, tmp);
                for (int g = 0; g < G; g++) {
                    const float *qg = qb + g * D;
                    float s = 0.f;
                    for (int d = 0; d < D; d++) s += qg[d] * k[d];
                    scores[g * L + start + i] = s * scale;
                }
            }
        }
        for (int g = 0; g < G; g++) {
            float *sg = scores + g * L, m = sg[0], sum = 0.f;
            for (int l = 1; l < L; l++) m = sg[l] > m ? sg[l] : m;
            for (int l = 0; l < L; l++) {
                sg[l] = expf(sg[l] - m);
                sum += sg[l];
            }
            const float inv = 1.f / sum;
            for (int l = 0; l < L; l++) sg[l] *= inv;
        }
        for (int start = 0; start < L; start += block_size) {
            const int64_t first = (int64_t)table[start / block_size] * block_size * row + kvh * D;
            const int n = L - start < block_size ? L - start : block_size;
#ifdef QK_AVX2
            if (D % 8 == 0) {
                pv_block(ob, v_cache, first, row, n, kv_dtype, G, D, scores, L, start, tmp);
                continue;
            }
#endif
            for (int i = 0; i < n; i++) {
                const float *v = kv_row(v_cache, first + i * row, kv_dtype, D, tmp);
                for (int g = 0; g < G; g++) {
                    const float p = scores[g * L + start + i];
                    float *og = ob + g * D;
                    for (int d = 0; d < D; d++) og[d] += p * v[d];
                }
            }
        }
        free(scores);
    }
}

/* n float32 values -> kv_dtype, as the fused decode step writes the cache (tests hold its
   rounding against torch's). */
void kv_store_rows(const float *x, void *out, int n, int kv_dtype) { kv_store(out, 0, kv_dtype, x, n); }
