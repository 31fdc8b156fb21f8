/* GGUF K-quants multiplied as stored: Q4_K (144 bytes per 256 values), Q5_K (176) and Q6_K (210).

   A super-block of 256 values is 8 blocks of 32, each with its own scale (Q6_K: one per 16
   values) and, for Q4_K / Q5_K, a min: w = d sc u - dmin m (u the 4 or 5 unsigned bits), Q6_K
   w = d sc (u - 32). The activations are quantized to int8 in blocks of 32 as for the other
   matmuls (quant.c), which line up with the weights' blocks, so each block's product is an
   integer dot product of unsigned weights and signed activations (dot_u8s8), scaled per block
   (per 16 values for Q6_K: lanes 0-3 and 4-7 of the product), and the mins come off as
   min * xs * sum(xq), per half block.

   Each super-block of a weight row is decoded once, in registers, for up to 8 activation rows
   (kq_rows), which get the same operations in the same order whatever their number, so a row's
   result does not depend on the batch. The same path runs for any number of rows (the fused
   decode step); prefill-sized calls from Python dequantize instead (kq_dequantize, exact) and
   run a float GEMM (qwenkit/kernels/__init__.py). Plain C takes the same arithmetic without
   AVX2. */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

#define QK_K 256
#ifndef KQ_STEP
#define KQ_STEP(mr) ((mr) <= 2 ? 4 : (mr) <= 4 ? 2 : 1) /* weight rows at a time, for mr activation rows */
#endif
#ifndef KQ_PREFETCH
#define KQ_PREFETCH 4 /* super-blocks ahead */
#endif
enum { KQ_Q4_K = 0, KQ_Q5_K = 1, KQ_Q6_K = 2 };
static const int KQ_BYTES[3] = {144, 176, 210};

/* Q4_K / Q5_K: the 6-bit scale and min of block j (0..7) from the 12 packed bytes. */
static inline void scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* One super-block, decoded: for each block j of 32 values its unsigned values u (bytes 0..63), the
   weight scale of each half (lo: values 0-15, hi: 16-31) and what each half's activation sum is
   multiplied by and taken off (Q4_K/Q5_K: the min; Q6_K: 32 scale). */
typedef struct {
    uint8_t u[8][32];
    float scale[8][2], off[8][2];
} kq_block;

#ifndef QK_AVX2
static void kq_decode(int type, const uint8_t *b, kq_block *out) {
    if (type == KQ_Q6_K) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        uint16_t h;
        memcpy(&h, b + 208, sizeof h);
        const float d = f16_to_f32(h);
        for (int n = 0; n < 2; n++, ql += 64, qh += 32, sc += 8)
            for (int t = 0; t < 4; t++) {
                const int j = 4 * n + t;
                for (int l = 0; l < 32; l++) {
                    const int low = t % 2 ? ql[l + 32] : ql[l];
                    out->u[j][l] = (uint8_t)(((t < 2 ? low : low >> 4) & 0xf) | (((qh[l] >> (2 * t)) & 3) << 4));
                }
                for (int half = 0; half < 2; half++) {
                    out->scale[j][half] = d * (float)sc[2 * t + half];
                    out->off[j][half] = 32.f * out->scale[j][half];
                }
            }
        return;
    }
    uint16_t h[2];
    memcpy(h, b, sizeof h);
    const float d = f16_to_f32(h[0]), dmin = f16_to_f32(h[1]);
    const uint8_t *scales = b + 4, *qh = b + 16, *qs = type == KQ_Q5_K ? b + 48 : b + 16;
    for (int j = 0; j < 8; j++) {
        int sc, m;
        scale_min_k4(j, scales, &sc, &m);
        out->scale[j][0] = out->scale[j][1] = d * (float)sc;
        out->off[j][0] = out->off[j][1] = dmin * (float)m;
        const uint8_t *q = qs + 32 * (j / 2);
        for (int l = 0; l < 32; l++) {
            uint8_t u = j % 2 ? q[l] >> 4 : q[l] & 0xf;
            if (type == KQ_Q5_K && (qh[l] >> j) & 1) u += 16;
            out->u[j][l] = u;
        }
    }
}

#endif

#ifdef QK_AVX2
/* kq_decode, 32 values at a time. */
static void kq_decode_avx2(int type, const uint8_t *b, kq_block *out) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), low2 = _mm256_set1_epi8(3);
    if (type == KQ_Q6_K) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        uint16_t h;
        memcpy(&h, b + 208, sizeof h);
        const float d = f16_to_f32(h);
        for (int n = 0; n < 2; n++, ql += 64, qh += 32, sc += 8) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)ql), c = _mm256_loadu_si256((const __m256i *)(ql + 32));
            const __m256i hb = _mm256_loadu_si256((const __m256i *)qh);
            const __m256i nibbles[4] = {_mm256_and_si256(a, low4), _mm256_and_si256(c, low4),
                                        _mm256_and_si256(_mm256_srli_epi16(a, 4), low4),
                                        _mm256_and_si256(_mm256_srli_epi16(c, 4), low4)};
            for (int t = 0; t < 4; t++) {
                const __m256i high = _mm256_and_si256(_mm256_srli_epi16(hb, 2 * t), low2);
                _mm256_storeu_si256((__m256i *)out->u[4 * n + t],
                                    _mm256_or_si256(nibbles[t], _mm256_slli_epi16(high, 4)));
                for (int half = 0; half < 2; half++) {
                    out->scale[4 * n + t][half] = d * (float)sc[2 * t + half];
                    out->off[4 * n + t][half] = 32.f * out->scale[4 * n + t][half];
                }
            }
        }
        return;
    }
    uint16_t h[2];
    memcpy(h, b, sizeof h);
    const float d = f16_to_f32(h[0]), dmin = f16_to_f32(h[1]);
    const uint8_t *scales = b + 4, *qs = type == KQ_Q5_K ? b + 48 : b + 16;
    const __m256i qh = type == KQ_Q5_K ? _mm256_loadu_si256((const __m256i *)(b + 16)) : _mm256_setzero_si256();
    for (int j = 0; j < 8; j++) {
        int sc, m;
        scale_min_k4(j, scales, &sc, &m);
        out->scale[j][0] = out->scale[j][1] = d * (float)sc;
        out->off[j][0] = out->off[j][1] = dmin * (float)m;
        const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * (j / 2)));
        __m256i u = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(q, 4) : q, low4);
        if (type == KQ_Q5_K) {
            const __m256i bit = _mm256_set1_epi8((char)(1 << j));
            u = _mm256_or_si256(u, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit),
                                                    _mm256_set1_epi8(16)));
        }
        _mm256_storeu_si256((__m256i *)out->u[j], u);
    }
}
#define KQ_DECODE kq_decode_avx2
#else
#define KQ_DECODE kq_decode
#endif

/* Per activation row: xq [K] int8 and xs [K / 32] as for every matmul, and half[K / 16]: xs of the
   block times the sum of xq over each half block (what the mins and Q6_K's offset multiply). */
static void kq_activations(const float *x, int K, int8_t *xq, float *xs, float *half) {
    quantize_row_q8(x, K, xq, xs);
    for (int j = 0; j < K / QK; j++)
        for (int s = 0; s < 2; s++) {
            int32_t sum = 0;
            for (int i = 0; i < 16; i++) sum += xq[j * QK + 16 * s + i];
            half[2 * j + s] = xs[j] * (float)sum;
        }
}

#ifdef QK_AVX2
/* The unsigned values of blocks 2p and 2p + 1 (Q4_K / Q5_K: one 32-byte load of nibbles) or
   blocks 4p..4p + 3 (Q6_K: one half super-block) of super-block b, into u. */
static inline __attribute__((always_inline)) int kq_unsigned(int type, const uint8_t *b, int p, __m256i u[4]) {
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    if (type == KQ_Q6_K) {
        const uint8_t *ql = b + 64 * p, *qh = b + 128 + 32 * p;
        const __m256i a = _mm256_loadu_si256((const __m256i *)ql), c = _mm256_loadu_si256((const __m256i *)(ql + 32));
        const __m256i hb = _mm256_loadu_si256((const __m256i *)qh), low2 = _mm256_set1_epi8(3);
        u[0] = _mm256_or_si256(_mm256_and_si256(a, low4), _mm256_slli_epi16(_mm256_and_si256(hb, low2), 4));
        u[1] = _mm256_or_si256(_mm256_and_si256(c, low4),
                               _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), low2), 4));
        u[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), low4),
                               _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), low2), 4));
        u[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), low4),
                               _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), low2), 4));
        return 4;
    }
    const __m256i q = _mm256_loadu_si256((const __m256i *)(b + (type == KQ_Q5_K ? 48 : 16) + 32 * p));
    u[0] = _mm256_and_si256(q, low4);
    u[1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
    if (type == KQ_Q5_K) {
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16)), sixteen = _mm256_set1_epi8(16);
        for (int t = 0; t < 2; t++) {
            const __m256i bit = _mm256_set1_epi8((char)(1 << (2 * p + t)));
            u[t] = _mm256_or_si256(u[t], _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit), sixteen));
        }
    }
    return 2;
}

/* The 8 scales and 8 mins of a Q4_K / Q5_K super-block, unpacked from their 12 bytes 4 at a time
   (the same bits as scale_min_k4): bytes 0-7 of the result the scales, 8-15 the mins. */
static inline void kq_scale_bytes(const uint8_t *packed, uint8_t out[16]) {
    uint32_t u[4];
    memcpy(u, packed, 12);
    const uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
    u[3] = ((u[2] >> 4) & low4) | (((u[1] >> 6) & low2) << 4);
    const uint32_t mins_low = u[1] & low6;
    u[1] = (u[2] & low4) | (((u[0] >> 6) & low2) << 4);
    u[2] = mins_low;
    u[0] &= low6;
    memcpy(out, u, 16);
}

static inline __m256 bytes_to_ps(const void *bytes8, int is_signed) { /* 8 bytes -> 8 floats */
    const __m128i b = _mm_loadl_epi64((const __m128i *)bytes8);
    return _mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
}

/* nr weight rows (row r's super-blocks at w + r * row_bytes) against mr activation rows (nr * mr
   <= 8): out[m][r]. Each super-block is decoded once for the mr rows, in registers; the nr weight
   rows are independent chains of operations (one row alone would wait on its own fmadds). Every
   (activation row, weight row) pair gets the same operations in the same order whatever nr and mr
   are, so a row's result does not depend on the batch. Per super-block and pair, the 8 blocks'
   weight scales are multiplied by the row's 8 activation scales in one vector op (Q6_K: two, a
   scale per half block), and each block takes its lanes with a permute. */
static inline __attribute__((always_inline)) void kq_rows(int type, const uint8_t *w, int64_t row_bytes,
                                                          const int8_t *xq, const float *xs, const float *half,
                                                          int K, int nr, int mr, float out[8][4]) {
    const int nb = K / QK, nsb = K / QK_K;
    __m256 acc[8][4][2], corr[8][4]; /* two chains of fmadds per pair: even and odd blocks */
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < nr; r++) acc[m][r][0] = acc[m][r][1] = corr[m][r] = _mm256_setzero_ps();
    for (int sb = 0; sb < nsb; sb++) {
        for (int r = 0; r < nr; r++) {
            const uint8_t *b = w + r * row_bytes + (int64_t)sb * KQ_BYTES[type];
            for (int line = 0; line < KQ_BYTES[type]; line += 64) /* every cache line, a few blocks ahead */
                _mm_prefetch((const char *)(b + KQ_PREFETCH * KQ_BYTES[type] + line), _MM_HINT_T0);
            /* scale[0..1]: per block j (Q4_K / Q5_K: lane j of scale[0]) or per half (Q6_K: lanes
               2 (j % 4) + s of scale[j / 4]); off[0..1]: per half block, what its activation sum
               is taken by */
            __m256 scale[2], off[2];
            if (type == KQ_Q6_K) {
                uint16_t h;
                memcpy(&h, b + 208, sizeof h);
                const __m256 d = _mm256_set1_ps(f16_to_f32(h)), d32 = _mm256_set1_ps(32.f * f16_to_f32(h));
                for (int t = 0; t < 2; t++) {
                    const __m256 sc = bytes_to_ps(b + 192 + 8 * t, 1);
                    scale[t] = _mm256_mul_ps(d, sc);
                    off[t] = _mm256_mul_ps(d32, sc);
                }
            } else {
                uint16_t h[2];
                uint8_t sm[16];
                memcpy(h, b, sizeof h);
                kq_scale_bytes(b + 4, sm);
                scale[0] = scale[1] = _mm256_mul_ps(_mm256_set1_ps(f16_to_f32(h[0])), bytes_to_ps(sm, 0));
                const __m256 mins = _mm256_mul_ps(_mm256_set1_ps(f16_to_f32(h[1])), bytes_to_ps(sm + 8, 0));
                /* per half block: each block's min twice */
                off[0] = _mm256_permutevar8x32_ps(mins, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
                off[1] = _mm256_permutevar8x32_ps(mins, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7));
            }
            __m256 sx[8][2]; /* per activation row: the scales above times its activation scales */
            for (int m = 0; m < mr; m++) {
                const float *hm = half + (int64_t)m * 2 * nb + 16 * sb;
                corr[m][r] = _mm256_fmadd_ps(off[0], _mm256_loadu_ps(hm), corr[m][r]);
                corr[m][r] = _mm256_fmadd_ps(off[1], _mm256_loadu_ps(hm + 8), corr[m][r]);
                const __m256 xs8 = _mm256_loadu_ps(xs + (int64_t)m * nb + 8 * sb);
                if (type == KQ_Q6_K) {
                    sx[m][0] = _mm256_mul_ps(scale[0], _mm256_permutevar8x32_ps(xs8, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)));
                    sx[m][1] = _mm256_mul_ps(scale[1], _mm256_permutevar8x32_ps(xs8, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7)));
                } else {
                    sx[m][0] = sx[m][1] = _mm256_mul_ps(scale[0], xs8);
                }
            }
            for (int p = 0, j0 = 0; j0 < 8; p++) {
                __m256i u[4];
                const int n = kq_unsigned(type, b, p, u);
                for (int t = 0; t < n; t++) {
                    const int jj = j0 + t, j = 8 * sb + jj;
                    /* lanes 0-3 of a block's product are values 0-15 (its low half), 4-7 the high half */
                    const int lo = 2 * (jj % 4), hi = lo + 1;
                    const __m256i lanes = type == KQ_Q6_K ? _mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi)
                                                          : _mm256_set1_epi32(jj);
                    for (int m = 0; m < mr; m++) {
                        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (int64_t)m * K + j * QK));
                        const __m256 prod = _mm256_cvtepi32_ps(dot_u8s8(u[t], xv));
                        const __m256 sc = _mm256_permutevar8x32_ps(sx[m][jj / 4], lanes);
                        acc[m][r][jj & 1] = _mm256_fmadd_ps(prod, sc, acc[m][r][jj & 1]);
                    }
                }
                j0 += n;
            }
        }
    }
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < nr; r++) out[m][r] = hsum(_mm256_add_ps(acc[m][r][0], acc[m][r][1])) - hsum(corr[m][r]);
}
#else
/* kq_rows in plain C. */
static void kq_rows(int type, const uint8_t *w, int64_t row_bytes, const int8_t *xq, const float *xs,
                    const float *half, int K, int nr, int mr, float out[8][4]) {
    const int nb = K / QK, nsb = K / QK_K;
    kq_block blk;
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < nr; r++) out[m][r] = 0.f;
    for (int r = 0; r < nr; r++)
        for (int sb = 0; sb < nsb; sb++) {
            kq_decode(type, w + r * row_bytes + (int64_t)sb * KQ_BYTES[type], &blk);
            for (int m = 0; m < mr; m++)
                for (int jj = 0; jj < 8; jj++) {
                    const int j = 8 * sb + jj;
                    const int8_t *a = xq + (int64_t)m * K + j * QK;
                    int32_t dot[2] = {0, 0};
                    for (int i = 0; i < QK; i++) dot[i / 16] += (int32_t)blk.u[jj][i] * a[i];
                    for (int s = 0; s < 2; s++)
                        out[m][r] += blk.scale[jj][s] * xs[(int64_t)m * nb + j] * (float)dot[s] -
                                     blk.off[jj][s] * half[(int64_t)m * 2 * nb + 2 * j + s];
                }
        }
}
#endif

/* Weight rows 4 n4 .. 4 n4 + 3 against all M activation rows. */
static inline __attribute__((always_inline)) void kq_panel(int type, int n4, const int8_t *xq, const float *xs,
                                                           const float *half, const uint8_t *w, float *y, int M,
                                                           int N, int K) {
    const int nb = K / QK;
    const int64_t row_bytes = (int64_t)(K / QK_K) * KQ_BYTES[type];
    for (int m0 = 0; m0 < M; m0 += 8) {
        const int mr = M - m0 < 8 ? M - m0 : 8, step = KQ_STEP(mr);
        const int8_t *xqm = xq + (int64_t)m0 * K;
        const float *xsm = xs + (int64_t)m0 * nb, *hm = half + (int64_t)m0 * 2 * nb;
        for (int n0 = 4 * n4; n0 < 4 * n4 + 4 && n0 < N; n0 += step) {
            const int nr = N - n0 < step ? N - n0 : step;
            const uint8_t *wn = w + n0 * row_bytes;
            float out[8][4];
            /* constant shapes: the accumulators stay in registers */
            if (nr == 4 && mr == 1) kq_rows(type, wn, row_bytes, xqm, xsm, hm, K, 4, 1, out);
            else if (nr == 4 && mr == 2) kq_rows(type, wn, row_bytes, xqm, xsm, hm, K, 4, 2, out);
            else if (nr == 2 && mr == 4) kq_rows(type, wn, row_bytes, xqm, xsm, hm, K, 2, 4, out);
            else if (nr == 1 && mr == 8) kq_rows(type, wn, row_bytes, xqm, xsm, hm, K, 1, 8, out);
            else kq_rows(type, wn, row_bytes, xqm, xsm, hm, K, nr, mr, out);
            for (int m = 0; m < mr; m++)
                for (int r = 0; r < nr; r++) y[(int64_t)(m0 + m) * N + n0 + r] = out[m][r];
        }
    }
}

/* y[m, n] = sum_k x[m, k] w[n, k], w as K-quant super-blocks of `type` ([N, K / 256] blocks, rows
   contiguous). K a multiple of 256. Returns 0, or -1 when out of memory. */
static int kq_linear(int type, const float *x, const uint8_t *w, float *y, int M, int N, int K) {
    const int nb = K / QK;
    int8_t *xq = malloc((size_t)M * K);
    float *xs = malloc(sizeof(float) * (size_t)M * nb), *half = malloc(sizeof(float) * (size_t)M * 2 * nb);
    if (!xq || !xs || !half) { free(xq); free(xs); free(half); return -1; }
#pragma omp parallel for if (M > 8)
    for (int m = 0; m < M; m++)
        kq_activations(x + (int64_t)m * K, K, xq + (int64_t)m * K, xs + (int64_t)m * nb, half + (int64_t)m * 2 * nb);
#pragma omp parallel for schedule(static)
    for (int n4 = 0; n4 < (N + 3) / 4; n4++)
        switch (type) { /* a constant type in each: the decoding specialised, its loops unrolled */
        case KQ_Q4_K: kq_panel(KQ_Q4_K, n4, xq, xs, half, w, y, M, N, K); break;
        case KQ_Q5_K: kq_panel(KQ_Q5_K, n4, xq, xs, half, w, y, M, N, K); break;
        default: kq_panel(KQ_Q6_K, n4, xq, xs, half, w, y, M, N, K); break;
        }
    free(xq);
    free(xs);
    free(half);
    return 0;
}

/* Rows of K-quant super-blocks -> float32 [N, K], exactly as gguf dequantizes them. */
static void kq_dequantize(int type, const uint8_t *w, float *out, int N, int K) {
    const int nsb = K / QK_K;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        kq_block blk;
        for (int sb = 0; sb < nsb; sb++) {
            KQ_DECODE(type, w + ((int64_t)n * nsb + sb) * KQ_BYTES[type], &blk);
            float *o = out + (int64_t)n * K + sb * QK_K;
            for (int j = 0; j < 8; j++)
                for (int i = 0; i < QK; i++) {
                    const int s = i / 16;
                    o[j * QK + i] = type == KQ_Q6_K ? blk.scale[j][s] * (float)((int)blk.u[j][i] - 32)
                                                    : blk.scale[j][s] * (float)blk.u[j][i] - blk.off[j][s];
                }
        }
    }
}

int q4_k_linear_q8(const float *x, const uint8_t *w, float *y, int M, int N, int K) {
    return kq_linear(KQ_Q4_K, x, w, y, M, N, K);
}
int q5_k_linear_q8(const float *x, const uint8_t *w, float *y, int M, int N, int K) {
    return kq_linear(KQ_Q5_K, x, w, y, M, N, K);
}
int q6_k_linear_q8(const float *x, const uint8_t *w, float *y, int M, int N, int K) {
    return kq_linear(KQ_Q6_K, x, w, y, M, N, K);
}
void q4_k_dequantize(const uint8_t *w, float *out, int N, int K) { kq_dequantize(KQ_Q4_K, w, out, N, K); }
void q5_k_dequantize(const uint8_t *w, float *out, int N, int K) { kq_dequantize(KQ_Q5_K, w, out, N, K); }
void q6_k_dequantize(const uint8_t *w, float *out, int N, int K) { kq_dequantize(KQ_Q6_K, w, out, N, K); }
