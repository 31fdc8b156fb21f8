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

/* ---- Prefill: many query tokens per sequence, causal, read in place from the paged cache.
   One OpenMP task per (sequence, kv head, tile of query tokens): the tile's rows (each token's G
   query heads; a multiple of 4, about 48) against the context's keys up to its last token, a
   chunk of PF_KEYS keys at a time, with a running maximum and sum per row (flash attention's
   online softmax): no [rows, context] matrix of scores is kept. A chunk is widened to float32 once
   for all the tile's rows, its keys transposed (a vector lane a key); then, 4 rows at a time, the
   scores are summed in registers over the head dim and the output over the chunk's keys. A row's
   keys past its own position weigh exactly zero (its output and sum are scaled by exactly 1 where a
   chunk brings it nothing), and chunks start at fixed positions, so a row's numbers do not depend
   on the tile, the step or the batch it came in. */

#define PF_KEYS 32

/* Query tokens of a tile (G rows each): about 48 rows, a multiple of 4. */
static inline int pf_tokens(int G) { return 4 * ((12 + G - 1) / G); }

/* s[m * PF_KEYS + j] = scale * q[m] . key j, for mr <= 4 rows q[m] and the chunk's keys transposed,
   kt [D][PF_KEYS]: per dim, each row's value times the chunk's keys (AVX-512: 4 rows x 2 vectors
   of keys in registers; AVX2: 2 rows x 4 vectors, twice). */
static inline __attribute__((always_inline)) void pf_scores(const float *const q[4], int mr, const float *kt, int D,
                                                            float scale, float *s) {
#ifdef QK_AVX512
    __m512 acc[4][2];
    for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int d = 0; d < D; d++) {
        __m512 k0 = _mm512_loadu_ps(kt + d * PF_KEYS), k1 = _mm512_loadu_ps(kt + d * PF_KEYS + 16);
        IN_REGISTER_512(k0); /* loaded once for the 4 rows (gcc would load them again for every FMA) */
        IN_REGISTER_512(k1);
        for (int m = 0; m < mr; m++) {
            const __m512 qd = _mm512_set1_ps(q[m][d]);
            acc[m][0] = _mm512_fmadd_ps(qd, k0, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(qd, k1, acc[m][1]);
        }
    }
    for (int m = 0; m < mr; m++)
        for (int h = 0; h < 2; h++)
            _mm512_storeu_ps(s + m * PF_KEYS + 16 * h, _mm512_mul_ps(acc[m][h], _mm512_set1_ps(scale)));
#elif defined(QK_AVX2)
    for (int m0 = 0; m0 < mr; m0 += 2) {
        const int rows = mr - m0 < 2 ? mr - m0 : 2;
        __m256 acc[2][4];
        for (int m = 0; m < rows; m++)
            for (int h = 0; h < 4; h++) acc[m][h] = _mm256_setzero_ps();
        for (int d = 0; d < D; d++) {
            __m256 k[4];
            for (int h = 0; h < 4; h++) {
                k[h] = _mm256_loadu_ps(kt + d * PF_KEYS + 8 * h);
                IN_REGISTER(k[h]);
            }
            for (int m = 0; m < rows; m++) {
                const __m256 qd = broadcast_load(q[m0 + m] + d);
                for (int h = 0; h < 4; h++) acc[m][h] = _mm256_fmadd_ps(qd, k[h], acc[m][h]);
            }
        }
        for (int m = 0; m < rows; m++)
            for (int h = 0; h < 4; h++)
                _mm256_storeu_ps(s + (m0 + m) * PF_KEYS + 8 * h, _mm256_mul_ps(acc[m][h], _mm256_set1_ps(scale)));
    }
#else
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < PF_KEYS; j++) {
            float acc = 0.f;
            for (int d = 0; d < D; d++) acc += q[m][d] * kt[d * PF_KEYS + j];
            s[m * PF_KEYS + j] = acc * scale;
        }
#endif
}

/* A row's scores of a chunk -> its weights, in place: the first `valid` keys weigh, the rest get
   exactly zero; its running maximum and sum updated. Returns the factor the row's output so far
   is to be scaled by (exactly 1 where the chunk brings it nothing). */
static inline float pf_softmax(float *s, int valid, float *max, float *sum) {
    valid = valid < 0 ? 0 : valid;
#ifdef QK_AVX2
    /* AVX-512 too: 8 lanes at a time, the chunk's 32 scores in 4 vectors */
    const __m256i n = _mm256_set1_epi32(valid);
    __m256 v[4], top8 = _mm256_set1_ps(-INFINITY);
    for (int h = 0; h < 4; h++) {
        const __m256i lane = _mm256_setr_epi32(8 * h, 8 * h + 1, 8 * h + 2, 8 * h + 3, 8 * h + 4, 8 * h + 5, 8 * h + 6,
                                               8 * h + 7);
        v[h] = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(s + 8 * h),
                                _mm256_castsi256_ps(_mm256_cmpgt_epi32(n, lane)));
        top8 = _mm256_max_ps(top8, v[h]);
    }
    const float top = hmax(top8);
#else
    for (int j = valid; j < PF_KEYS; j++) s[j] = -INFINITY;
    float top = s[0];
    for (int j = 1; j < PF_KEYS; j++) top = s[j] > top ? s[j] : top;
#endif
    const float m = top > *max ? top : *max;
    if (m == -INFINITY) { /* no key seen yet (not reached: every row sees position 0 first) */
        memset(s, 0, sizeof(float) * PF_KEYS);
        return 1.f;
    }
#ifdef QK_AVX2
    const __m256 mv = _mm256_set1_ps(m);
    __m256 total = _mm256_setzero_ps();
    for (int h = 0; h < 4; h++) {
        v[h] = exp8_nonpositive(_mm256_sub_ps(v[h], mv));
        _mm256_storeu_ps(s + 8 * h, v[h]);
        total = _mm256_add_ps(total, v[h]);
    }
    const float alpha = _mm256_cvtss_f32(exp8_nonpositive(_mm256_set1_ps(*max - m)));
    *sum = *sum * alpha + hsum(total);
#else
    const float alpha = expf(*max - m);
    float chunk = 0.f;
    for (int j = 0; j < PF_KEYS; j++) chunk += s[j] = expf(s[j] - m);
    *sum = *sum * alpha + chunk;
#endif
    *max = m;
    return alpha;
}

#ifdef QK_AVX512
/* pf_values on dims d0 .. d0 + 16 tiles - 1 (a constant where it is called; 4: 16 sums in flight,
   per key 4 loads of values and 4 of weights for 16 FMAs). */
static inline __attribute__((always_inline)) void pf_values_512(float *const o[4], const float *alpha,
                                                                const float *const p[4], int mr, const float *vb,
                                                                int n, int D, int d0, int tiles) {
    __m512 acc[4][4];
    for (int m = 0; m < mr; m++)
        for (int t = 0; t < tiles; t++)
            acc[m][t] = _mm512_mul_ps(_mm512_loadu_ps(o[m] + d0 + 16 * t), _mm512_set1_ps(alpha[m]));
    for (int j = 0; j < n; j++) {
        __m512 v[4];
        for (int t = 0; t < tiles; t++) {
            v[t] = _mm512_loadu_ps(vb + (int64_t)j * D + d0 + 16 * t);
            IN_REGISTER_512(v[t]);
        }
        for (int m = 0; m < mr; m++) {
            const __m512 pj = _mm512_set1_ps(p[m][j]);
            for (int t = 0; t < tiles; t++) acc[m][t] = _mm512_fmadd_ps(pj, v[t], acc[m][t]);
        }
    }
    for (int m = 0; m < mr; m++)
        for (int t = 0; t < tiles; t++) _mm512_storeu_ps(o[m] + d0 + 16 * t, acc[m][t]);
}
#endif

/* o[m] = o[m] * alpha[m] + sum_j p[m][j] v[j] over the chunk's n value rows vb [n][D], for mr <= 4
   rows (D a multiple of 16). */
static inline __attribute__((always_inline)) void pf_values(float *const o[4], const float *alpha,
                                                            const float *const p[4], int mr, const float *vb, int n,
                                                            int D) {
#ifdef QK_AVX512
    int d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) pf_values_512(o, alpha, p, mr, vb, n, D, d0, 4);
    for (; d0 < D; d0 += 16) pf_values_512(o, alpha, p, mr, vb, n, D, d0, 1);
#elif defined(QK_AVX2)
    for (int d0 = 0; d0 < D; d0 += 16) {
        __m256 acc[4][2];
        for (int m = 0; m < mr; m++) {
            const __m256 a = _mm256_set1_ps(alpha[m]);
            acc[m][0] = _mm256_mul_ps(_mm256_loadu_ps(o[m] + d0), a);
            acc[m][1] = _mm256_mul_ps(_mm256_loadu_ps(o[m] + d0 + 8), a);
        }
        for (int j = 0; j < n; j++) {
            __m256 v0 = _mm256_loadu_ps(vb + (int64_t)j * D + d0), v1 = _mm256_loadu_ps(vb + (int64_t)j * D + d0 + 8);
            IN_REGISTER(v0);
            IN_REGISTER(v1);
            for (int m = 0; m < mr; m++) {
                const __m256 pj = broadcast_load(p[m] + j);
                acc[m][0] = _mm256_fmadd_ps(pj, v0, acc[m][0]);
                acc[m][1] = _mm256_fmadd_ps(pj, v1, acc[m][1]);
            }
        }
        for (int m = 0; m < mr; m++) {
            _mm256_storeu_ps(o[m] + d0, acc[m][0]);
            _mm256_storeu_ps(o[m] + d0 + 8, acc[m][1]);
        }
    }
#else
    for (int m = 0; m < mr; m++)
        for (int d = 0; d < D; d++) {
            float acc = o[m][d] * alpha[m];
            for (int j = 0; j < n; j++) acc += p[m][j] * vb[(int64_t)j * D + d];
            o[m][d] = acc;
        }
#endif
}

/* The n keys of a chunk (key j at cache element at[j]) -> kt [D][PF_KEYS] (lanes past n zero); its
   values -> vb [n][D]; kw: room for [PF_KEYS][D]. */
static void pf_widen(const void *k_cache, const void *v_cache, const int64_t *at, int n, int kv_dtype, int D,
                     float *kt, float *vb, float *kw) {
    for (int j = 0; j < PF_KEYS; j++) {
        float *kj = kw + (int64_t)j * D, *vj = vb + (int64_t)j * D;
        if (j >= n) {
            memset(kj, 0, sizeof(float) * D);
            continue;
        }
        const float *k = kv_row(k_cache, at[j], kv_dtype, D, kj), *v = kv_row(v_cache, at[j], kv_dtype, D, vj);
        if (k != kj) memcpy(kj, k, sizeof(float) * D);
        if (v != vj) memcpy(vj, v, sizeof(float) * D);
    }
#ifdef QK_AVX2
    for (int j0 = 0; j0 < PF_KEYS; j0 += 8)
        for (int d0 = 0; d0 < D; d0 += 8) {
            __m256i t[8];
            for (int j = 0; j < 8; j++) t[j] = _mm256_loadu_si256((const __m256i *)(kw + (int64_t)(j0 + j) * D + d0));
            transpose_8x8_epi32(t);
            for (int d = 0; d < 8; d++) _mm256_storeu_si256((__m256i *)(kt + (int64_t)(d0 + d) * PF_KEYS + j0), t[d]);
        }
#else
    for (int j = 0; j < PF_KEYS; j++)
        for (int d = 0; d < D; d++) kt[(int64_t)d * PF_KEYS + j] = kw[(int64_t)j * D + d];
#endif
}

/* q, out: [T, H, D] float32, sequence b's query tokens at rows query_start_loc[b] ..
   query_start_loc[b + 1] - 1 and positions context_lens[b] - query_len .. context_lens[b] - 1, every
   key and value of its context (theirs included) already in the cache; k_cache, v_cache, block
   tables as paged_decode_attention_f32's. D a multiple of 16. -1: no memory. */
int paged_prefill_attention_f32(const float *q, const void *k_cache, const void *v_cache, const int32_t *block_tables,
                                const int32_t *query_start_loc, const int32_t *context_lens, float *out, int B, int H,
                                int KVH, int D, int block_size, int max_blocks, float scale, int kv_dtype) {
    const int G = H / KVH, QT = pf_tokens(G), R = QT * G;
    const int64_t row = (int64_t)KVH * D;
    int *first_task = malloc(sizeof(int) * (B + 1)); /* sequence b's tasks: first_task[b] .. first_task[b + 1] - 1 */
    if (!first_task) return -1;
    first_task[0] = 0;
    for (int b = 0; b < B; b++)
        first_task[b + 1] = first_task[b] + KVH * ((query_start_loc[b + 1] - query_start_loc[b] + QT - 1) / QT);
    int failed = 0;
#pragma omp parallel
    {
        /* per thread: the tile's outputs, weights, maxima, sums and factors; a chunk's keys and values */
        float *buf = malloc(sizeof(float) * ((size_t)R * D + (size_t)R * PF_KEYS + 3 * (size_t)R +
                                             3 * (size_t)PF_KEYS * D));
        float *o = buf, *s = o + (size_t)R * D, *top = s + (size_t)R * PF_KEYS, *sum = top + R, *alpha = sum + R;
        float *kt = alpha + R, *vb = kt + (size_t)PF_KEYS * D, *kw = vb + (size_t)PF_KEYS * D;
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < first_task[B]; task++) {
            if (!buf) continue;
            int b = 0;
            while (first_task[b + 1] <= task) b++;
            const int kvh = (task - first_task[b]) % KVH, t0 = (task - first_task[b]) / KVH * QT;
            const int qlen = query_start_loc[b + 1] - query_start_loc[b], L = context_lens[b];
            const int nt = qlen - t0 < QT ? qlen - t0 : QT, rows = nt * G, first_pos = L - qlen + t0;
            const int32_t *table = block_tables + (int64_t)b * max_blocks;
            /* row r: token t0 + r / G, head kvh * G + r % G */
            const float *qr[R];
            for (int r = 0; r < rows; r++) {
                qr[r] = q + ((int64_t)(query_start_loc[b] + t0 + r / G) * H + kvh * G + r % G) * D;
                top[r] = -INFINITY;
                sum[r] = 0.f;
            }
            memset(o, 0, sizeof(float) * rows * D);
            for (int p0 = 0; p0 < first_pos + nt; p0 += PF_KEYS) {
                const int n = first_pos + nt - p0 < PF_KEYS ? first_pos + nt - p0 : PF_KEYS;
                int64_t at[PF_KEYS];
                for (int j = 0; j < n; j++) {
                    const int pos = p0 + j;
                    at[j] = ((int64_t)table[pos / block_size] * block_size + pos % block_size) * row + kvh * D;
                }
                pf_widen(k_cache, v_cache, at, n, kv_dtype, D, kt, vb, kw);
                for (int r0 = 0; r0 < rows; r0 += 4) {
                    const int mr = rows - r0 < 4 ? rows - r0 : 4;
                    const float *pr[4];
                    float *orow[4];
                    for (int m = 0; m < mr; m++) {
                        pr[m] = s + (int64_t)(r0 + m) * PF_KEYS;
                        orow[m] = o + (int64_t)(r0 + m) * D;
                    }
                    if (mr == 4)
                        pf_scores(qr + r0, 4, kt, D, scale, s + (int64_t)r0 * PF_KEYS);
                    else
                        pf_scores(qr + r0, mr, kt, D, scale, s + (int64_t)r0 * PF_KEYS);
                    for (int m = 0; m < mr; m++) {
                        /* the chunk's keys at or before the row's position weigh; the rest (and lanes past n) not */
                        const int r = r0 + m, seen = first_pos + r / G - p0 + 1;
                        alpha[r] = pf_softmax(s + (int64_t)r * PF_KEYS, seen < n ? seen : n, top + r, sum + r);
                    }
                    if (mr == 4)
                        pf_values(orow, alpha + r0, pr, 4, vb, n, D);
                    else
                        pf_values(orow, alpha + r0, pr, mr, vb, n, D);
                }
            }
            for (int r = 0; r < rows; r++) {
                float *dst = out + (qr[r] - q); /* out is laid out as q */
                const float inv = 1.f / sum[r];
                for (int d = 0; d < D; d++) dst[d] = o[(int64_t)r * D + d] * inv;
            }
        }
        free(buf);
    }
    free(first_task);
    return failed ? -1 : 0;
}
