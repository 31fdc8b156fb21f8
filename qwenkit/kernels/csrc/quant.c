/* Quantized matmuls: int8 weights (one bfloat16 scale per output row), and GGUF Q5_0 blocks
   (22 bytes per 32 values; regrouped at load, the same size).

   As llama.cpp does, the activations are first quantized to int8 in blocks of 32 values (QK, one
   float scale each); the products are integer dot products (AVX2 `maddubs` + `madd`: 32
   multiply-adds in two instructions), summed in float per block. Each weight is read once per
   call and used for every activation row: int8 in tiles of 4 weight rows x 2 activation rows;
   Q5_0 below UNPACK_ROWS rows (decode) decoded in registers, for 8 activation rows at a time and
   then tiles of 2 weight x 4 activation rows, and from UNPACK_ROWS rows on (prefill) in panels
   of 8 weight rows unpacked once per call, a vector lane a row (q5_0_panel_tile), which sum in
   another order. Below that threshold a row's result does not depend on the other rows of the
   call. OpenMP over blocks of output rows. Without AVX2 the same arithmetic runs as plain C. */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

#ifdef QK_AMX
#define AMX_MIN_ROWS 16 /* from a full tile of activation rows on, the matmuls run on AMX tiles */
static int amx_linear(const float *x, const void *w, int q5_0, const uint16_t *scale, float *y, int M, int N, int K);
#endif

#ifndef UNPACK_ROWS
#define UNPACK_ROWS 16 /* from this many activation rows on, Q5_0 panels are unpacked first */
#endif
#ifndef PANEL_MT
#define PANEL_MT 3 /* activation rows a tile of the Q5_0 panels (<= 4; 2 and 4 measured 0-5% slower) */
#endif

/* While set (qk_set_row_invariant), the matmuls below take one path whatever the number of
   activation rows M (no AMX tiles, no Q5_0 panels from UNPACK_ROWS rows on): each row's
   result is then the same alone or among any others (--deterministic). The paths left are the
   tile kernels, which keep one order of operations per (activation row, weight row). */
static int row_invariant = 0;

void qk_set_row_invariant(int on) { row_invariant = on; }
int qk_row_invariant(void) { return row_invariant; }

/* x[K] -> xq[K] int8 and xs[ceil(K / QK)]: xs[j] = max |x| over block j / 127 (the last block
   may be short). */
void quantize_row_q8(const float *x, int K, int8_t *xq, float *xs) {
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
    __m256 acc[2][4];
    for (int m = 0; m < 2; m++)
        for (int r = 0; r < 4; r++) acc[m][r] = _mm256_setzero_ps();
#ifdef QK_AVX512
    /* Two blocks per instruction: lanes 0-7 of a product are block j0, lanes 8-15 block j0 + 1. */
    __m512 acc2[2][4];
    for (int m = 0; m < 2; m++)
        for (int r = 0; r < 4; r++) acc2[m][r] = _mm512_setzero_ps();
    for (; j0 + 2 <= K / QK; j0 += 2) {
        __m512 sx[2];
        for (int m = 0; m < mr; m++) sx[m] = pair_ps(xs[m * nb + j0], xs[m * nb + j0 + 1]);
        prefetch_ahead(w, (int64_t)j0 * QK * nr, 2 * QK * nr);
        for (int r = 0; r < nr; r++) {
            const int8_t *wp = w + (int64_t)r * K + j0 * QK;
            const __m512i wv = _mm512_loadu_si512((const void *)wp);
            const __mmask64 negative = _mm512_movepi8_mask(wv);
            const __m512i wabs = _mm512_abs_epi8(wv);
            for (int m = 0; m < mr; m++) {
                const __m512i xv = _mm512_loadu_si512((const void *)(xq + (int64_t)m * K + j0 * QK));
                /* |w| * (x with w's sign), four products a lane */
                const __m512i signed_x = _mm512_mask_sub_epi8(xv, negative, _mm512_setzero_si512(), xv);
                const __m512 p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wabs, signed_x));
                acc2[m][r] = _mm512_fmadd_ps(p, sx[m], acc2[m][r]);
            }
        }
    }
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < nr; r++)
            acc[m][r] = _mm256_add_ps(_mm512_castps512_ps256(acc2[m][r]),
                                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc2[m][r]), 1)));
#endif
    for (; j0 < K / QK; j0++) {
        __m256 sx[2];
        for (int m = 0; m < mr; m++) sx[m] = _mm256_set1_ps(xs[m * nb + j0]);
        prefetch_ahead(w, (int64_t)j0 * QK * nr, QK * nr);
        for (int r = 0; r < nr; r++) {
            const int8_t *wp = w + (int64_t)r * K + j0 * QK;
            const __m256i wv = _mm256_loadu_si256((const __m256i *)wp);
            const __m256i wabs = _mm256_sign_epi8(wv, wv);
            for (int m = 0; m < mr; m++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (int64_t)m * K + j0 * QK));
                /* |w| * (x with w's sign): unsigned x signed bytes (pairs at most 2 * 127 * 127) */
                const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(wabs, _mm256_sign_epi8(xv, wv)));
                acc[m][r] = _mm256_fmadd_ps(p, sx[m], acc[m][r]);
            }
        }
    }
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < nr; r++) {
            out[m][r] = hsum(acc[m][r]);
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
#ifdef QK_AMX
    if (M >= AMX_MIN_ROWS && K % QK == 0 && !row_invariant) return amx_linear(x, w, 0, scale, y, M, N, K);
#endif
    const int nb = (K + QK - 1) / QK;
    int8_t *xq = malloc((size_t)M * K);
    float *xs = malloc(sizeof(float) * (size_t)M * nb);
    if (!xq || !xs) { free(xq); free(xs); return -1; }
    #pragma omp parallel for if (M > 8)
    for (int m = 0; m < M; m++) quantize_row_q8(x + (int64_t)m * K, K, xq + (int64_t)m * K, xs + (int64_t)m * nb);
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

/* ---- GGUF Q5_0 weights. In the file, per 32 values a 22-byte block: an fp16 scale d, 32 high
   bits qh and 16 bytes qs of low nibbles (value i < 16: low nibble of qs[i], bit i of qh; value
   i + 16: high nibble of qs[i], bit i + 16); w = (nibble + 16 * bit - 16) * d.
   The kernels take the rows regrouped at load (q5_0_pack; the same bytes a row): each whole
   group of Q5_0_GROUP = 8 blocks becomes 176 bytes, the 8 scales (16 bytes), then 4 x 32 bytes of
   nibbles (byte i of the p-th: value i of block 2p in its low nibble, of block 2p + 1 in its high
   one), then 32 bytes of high bits (byte i, bit b: the high bit of value i of block b); a row's
   last nb % 8 blocks stay as stored. A regrouped block decodes in 4-5 vector operations where a
   stored one takes 11, and the 8 scales convert in one: 1.1-1.3x on one-token matmuls, which
   are otherwise bound by that decoding (docs/decode.md). */

#define Q5_0_BYTES 22
#define Q5_0_GROUP 8
#define Q5_0_PAIRS 16   /* where a group's nibble pairs start (after its 8 scales) */
#define Q5_0_PLANES 144 /* where its high-bit planes start (after 4 x 32 bytes of pairs) */

#ifndef QK_AVX2
/* Block j of a regrouped row of nb blocks: its scale, and its 32 values as u = nibble + 16 * bit. */
static float q5_0_block(const uint8_t *row, int nb, int j, uint8_t u[QK]) {
    uint16_t h;
    if (j < nb / Q5_0_GROUP * Q5_0_GROUP) {
        const uint8_t *group = row + (int64_t)(j / Q5_0_GROUP * Q5_0_GROUP) * Q5_0_BYTES;
        const int b = j % Q5_0_GROUP;
        memcpy(&h, group + 2 * b, sizeof h);
        for (int i = 0; i < QK; i++) {
            const uint8_t pair = group[Q5_0_PAIRS + 32 * (b / 2) + i];
            u[i] = (uint8_t)(((b & 1 ? pair >> 4 : pair) & 0x0f) | (((group[Q5_0_PLANES + i] >> b) & 1) << 4));
        }
    } else {
        const uint8_t *block = row + (int64_t)j * Q5_0_BYTES;
        uint32_t qh;
        memcpy(&h, block, sizeof h);
        memcpy(&qh, block + 2, sizeof qh);
        for (int i = 0; i < 16; i++) {
            u[i] = (uint8_t)((block[6 + i] & 0x0f) | (((qh >> i) & 1) << 4));
            u[i + 16] = (uint8_t)((block[6 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4));
        }
    }
    return f16_to_f32(h);
}
#endif

#ifdef QK_AVX2
/* The 32 values of a stored Q5_0 block as unsigned bytes u = nibble + 16 * bit in [0, 31] (w = (u - 16) d). */
static inline __m256i q5_0_unsigned(const uint8_t *block) {
    const __m128i qs = _mm_loadu_si128((const __m128i *)(block + 6));
    const __m256i nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), _mm256_set1_epi8(0x0f));
    uint32_t qh;
    memcpy(&qh, block + 2, sizeof qh);
    /* byte i <- byte i / 8 of qh, then 0x10 where its bit i % 8 is set */
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh),
        _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                         2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    const __m256i high = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    return _mm256_or_si256(nibbles, _mm256_and_si256(high, _mm256_set1_epi8(0x10)));
}

/* The same for block b of a regrouped group (b a constant once the caller's loop is unrolled);
   planes: the group's 32 bytes of high bits. */
static inline __attribute__((always_inline)) __m256i q5_0_group_unsigned(const uint8_t *group, __m256i planes,
                                                                         int b) {
    const __m256i pair = _mm256_loadu_si256((const __m256i *)(group + Q5_0_PAIRS + 32 * (b / 2)));
    const __m256i nibbles = b & 1 ? _mm256_srli_epi16(pair, 4) : pair;
    const __m256i high = b < 4 ? _mm256_slli_epi16(planes, 4 - b) : _mm256_srli_epi16(planes, b - 4);
    return _mm256_or_si256(_mm256_and_si256(nibbles, _mm256_set1_epi8(0x0f)),
                           _mm256_and_si256(high, _mm256_set1_epi8(0x10)));
}
#endif

/* Rows of a file's Q5_0 blocks [N, K / 32] -> the kernels' layout, into out (not overlapping). */
void q5_0_pack(const uint8_t *stored, uint8_t *out, int N, int K) {
    const int nb = K / QK, grouped = nb / Q5_0_GROUP * Q5_0_GROUP;
    const int64_t row = (int64_t)nb * Q5_0_BYTES;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *src = stored + n * row;
        uint8_t *dst = out + n * row;
        for (int j = 0; j < grouped; j += Q5_0_GROUP) {
            uint8_t *group = dst + (int64_t)j * Q5_0_BYTES;
#ifdef QK_AVX2
            /* each block's values u = nibble + 16 * bit, then their nibbles paired and their bits
               gathered into the planes (the scalar code below took ~15% of the default model's load) */
            const __m256i low4 = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);
            __m256i u[Q5_0_GROUP], planes = _mm256_setzero_si256();
            for (int b = 0; b < Q5_0_GROUP; b++) {
                const uint8_t *block = src + (int64_t)(j + b) * Q5_0_BYTES;
                memcpy(group + 2 * b, block, 2);
                u[b] = q5_0_unsigned(block);
                const __m256i bit = _mm256_and_si256(_mm256_srli_epi16(u[b], 4), one); /* bit 0 of each byte */
                planes = _mm256_or_si256(planes, _mm256_sll_epi16(bit, _mm_cvtsi32_si128(b)));
            }
            for (int p = 0; p < Q5_0_GROUP / 2; p++)
                _mm256_storeu_si256((__m256i *)(group + Q5_0_PAIRS + 32 * p),
                                    _mm256_or_si256(_mm256_and_si256(u[2 * p], low4),
                                                    _mm256_slli_epi16(_mm256_and_si256(u[2 * p + 1], low4), 4)));
            _mm256_storeu_si256((__m256i *)(group + Q5_0_PLANES), planes);
#else
            memset(group, 0, Q5_0_GROUP * Q5_0_BYTES);
            for (int b = 0; b < Q5_0_GROUP; b++) {
                const uint8_t *block = src + (int64_t)(j + b) * Q5_0_BYTES;
                uint32_t qh;
                memcpy(&qh, block + 2, sizeof qh);
                memcpy(group + 2 * b, block, 2);
                for (int i = 0; i < QK; i++) {
                    const int nibble = i < 16 ? block[6 + i] & 0x0f : block[6 + i - 16] >> 4;
                    group[Q5_0_PAIRS + 32 * (b / 2) + i] |= (uint8_t)(nibble << (4 * (b & 1)));
                    group[Q5_0_PLANES + i] |= (uint8_t)(((qh >> i) & 1) << b);
                }
            }
#endif
        }
        memcpy(dst + (int64_t)grouped * Q5_0_BYTES, src + (int64_t)grouped * Q5_0_BYTES,
               (size_t)(nb - grouped) * Q5_0_BYTES);
    }
}

/* Q5_0 takes the 256-bit code below in the AVX-512 variants too (its dot products then VNNI's
   vpdpbusd on 256 bits): two blocks per 512-bit instruction measured slower on the one AVX-512
   machine measured, an AMX Xeon (2 threads; docs/benchmarks.md: the 0.5B model's shapes at 1 and
   8 rows, 1.1-1.8x the time of the AVX2 variant). */

/* out[m][r] for nr (<= 2) weight rows and mr (<= 4) activation rows:
   sum_j d[r][j] xs[m][j] (u[r] . xq[m] over block j) - sum_j d[r][j] c[m][j], c = 16 xs sum(xq).
   Per group of 8 blocks the scale products d xs are one vector multiply (a lane a block), read
   back a lane at a time by broadcasts; the d c terms are vectors of the same lanes, summed in a
   first pass over the group scales (so the products keep their registers) and across lanes at
   the end. q5_0_row_x8 computes the same numbers. */
static inline __attribute__((always_inline)) void q5_0_tile(const int8_t *xq, const float *xs, const float *c,
                                                            const uint8_t *w, int K, int nr, int mr,
                                                            float out[4][2]) {
    const int nb = K / QK, grouped = nb / Q5_0_GROUP * Q5_0_GROUP;
    const int64_t row = (int64_t)nb * Q5_0_BYTES;
#if defined(QK_AVX2)
    float corr[4][2] = {{0.f}}, dsx[4][2][Q5_0_GROUP] __attribute__((aligned(32)));
    __m256 acc[4][2], corr8[4][2];
    for (int m = 0; m < 4; m++)
        for (int r = 0; r < 2; r++) acc[m][r] = corr8[m][r] = _mm256_setzero_ps();
    for (int j = 0; j < grouped; j += Q5_0_GROUP) /* the corrections first: registers for the products below */
        for (int r = 0; r < nr; r++) {
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + r * row + (int64_t)j * Q5_0_BYTES)));
            for (int m = 0; m < mr; m++) corr8[m][r] = _mm256_fmadd_ps(d, _mm256_loadu_ps(c + m * nb + j), corr8[m][r]);
        }
    for (int j = 0; j < grouped; j += Q5_0_GROUP) {
        const uint8_t *group[2];
        __m256i planes[2];
        prefetch_ahead(w, (int64_t)j * Q5_0_BYTES * nr, Q5_0_GROUP * Q5_0_BYTES * nr);
        for (int r = 0; r < nr; r++) {
            group[r] = w + r * row + (int64_t)j * Q5_0_BYTES;
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)group[r]));
            planes[r] = _mm256_loadu_si256((const __m256i *)(group[r] + Q5_0_PLANES));
            for (int m = 0; m < mr; m++) _mm256_storeu_ps(dsx[m][r], _mm256_mul_ps(d, _mm256_loadu_ps(xs + m * nb + j)));
        }
        #pragma GCC unroll 8
        for (int b = 0; b < Q5_0_GROUP; b++) {
            __m256i u[2];
            for (int r = 0; r < nr; r++) u[r] = q5_0_group_unsigned(group[r], planes[r], b);
            for (int m = 0; m < mr; m++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (int64_t)m * K + (j + b) * QK));
                for (int r = 0; r < nr; r++) {
                    /* unsigned u x signed x bytes (pairs at most 2 * 31 * 127) */
                    const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(u[r], xv));
                    acc[m][r] = _mm256_fmadd_ps(p, broadcast_load(&dsx[m][r][b]), acc[m][r]);
                }
            }
        }
    }
    for (int j = grouped; j < nb; j++) {
        __m256i u[2];
        float d[2];
        prefetch_ahead(w, (int64_t)j * Q5_0_BYTES * nr, Q5_0_BYTES * nr);
        for (int r = 0; r < nr; r++) {
            const uint8_t *block = w + r * row + (int64_t)j * Q5_0_BYTES;
            uint16_t h;
            memcpy(&h, block, sizeof h);
            d[r] = f16_to_f32(h);
            u[r] = q5_0_unsigned(block);
        }
        for (int m = 0; m < mr; m++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (int64_t)m * K + j * QK));
            const float sx = xs[m * nb + j], cx = c[m * nb + j];
            for (int r = 0; r < nr; r++) {
                const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(u[r], xv));
                acc[m][r] = _mm256_fmadd_ps(p, _mm256_set1_ps(d[r] * sx), acc[m][r]);
                corr[m][r] = fmaf(d[r], cx, corr[m][r]);
            }
        }
    }
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < nr; r++) out[m][r] = hsum(acc[m][r]) - hsum(corr8[m][r]) - corr[m][r];
#else
    (void)grouped;
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < nr; r++) {
            float total = 0.f;
            for (int j = 0; j < nb; j++) {
                const int8_t *a = xq + (int64_t)m * K + j * QK;
                uint8_t u[QK];
                const float d = q5_0_block(w + r * row, nb, j, u);
                int32_t dot = 0;
                for (int i = 0; i < QK; i++) dot += a[i] * u[i];
                total += d * xs[m * nb + j] * (float)dot - d * c[m * nb + j];
            }
            out[m][r] = total;
        }
#endif
}

#ifdef QK_AVX2
/* One weight row against 8 activation rows, the same arithmetic as q5_0_tile per (row, weight
   row) (so a sequence's result does not depend on which tile its row falls in) with less work
   per product: the weight block is decoded once for 8 rows; xs8 holds the 8 rows' activation
   scales per block ([nb][8], a lane a row), so one multiply gives a block's 8 scale products,
   which each row then reads by a broadcast from memory (a permute per product instead: 1.4x the
   time in a microbenchmark of this function); c: the rows' corrections (rows of nb). */
static void q5_0_row_x8(const int8_t *xq, const float *xs8, const float *c, const uint8_t *w, int K, float out[8]) {
    const int nb = K / QK, grouped = nb / Q5_0_GROUP * Q5_0_GROUP;
    float corr[8] = {0.f}, dsx[8] __attribute__((aligned(32)));
    __m256 acc[8], corr8[8];
    for (int m = 0; m < 8; m++) acc[m] = corr8[m] = _mm256_setzero_ps();
    for (int j = 0; j < grouped; j += Q5_0_GROUP) { /* the corrections first: 8 registers fewer below */
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + (int64_t)j * Q5_0_BYTES)));
        for (int m = 0; m < 8; m++) corr8[m] = _mm256_fmadd_ps(d, _mm256_loadu_ps(c + m * nb + j), corr8[m]);
    }
    for (int j = 0; j < grouped; j += Q5_0_GROUP) {
        const uint8_t *group = w + (int64_t)j * Q5_0_BYTES;
        prefetch_ahead(w, (int64_t)j * Q5_0_BYTES, Q5_0_GROUP * Q5_0_BYTES);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)group));
        const __m256i planes = _mm256_loadu_si256((const __m256i *)(group + Q5_0_PLANES));
        #pragma GCC unroll 8
        for (int b = 0; b < Q5_0_GROUP; b++) {
            const __m256i u = q5_0_group_unsigned(group, planes, b);
            _mm256_storeu_ps(dsx, _mm256_mul_ps(_mm256_permutevar8x32_ps(d, _mm256_set1_epi32(b)),
                                                _mm256_loadu_ps(xs8 + 8 * (j + b))));
            for (int m = 0; m < 8; m++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (int64_t)m * K + (j + b) * QK));
                const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(u, xv));
                acc[m] = _mm256_fmadd_ps(p, broadcast_load(dsx + m), acc[m]);
            }
        }
    }
    for (int j = grouped; j < nb; j++) {
        const uint8_t *block = w + (int64_t)j * Q5_0_BYTES;
        prefetch_ahead(w, (int64_t)j * Q5_0_BYTES, Q5_0_BYTES);
        uint16_t h;
        memcpy(&h, block, sizeof h);
        const float d = f16_to_f32(h);
        const __m256i u = q5_0_unsigned(block);
        _mm256_storeu_ps(dsx, _mm256_mul_ps(_mm256_set1_ps(d), _mm256_loadu_ps(xs8 + 8 * j)));
        for (int m = 0; m < 8; m++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (int64_t)m * K + j * QK));
            const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(u, xv));
            acc[m] = _mm256_fmadd_ps(p, broadcast_load(dsx + m), acc[m]);
            corr[m] = fmaf(d, c[m * nb + j], corr[m]);
        }
    }
    for (int m = 0; m < 8; m++) out[m] = hsum(acc[m]) - hsum(corr8[m]) - corr[m];
}
#endif

/* One regrouped row of nb blocks -> nb * 32 int8 values in [-16, 15] and nb scales. */
static void q5_0_unpack_row(const uint8_t *row, int nb, int8_t *values, float *scales) {
#ifdef QK_AVX2
    const int grouped = nb / Q5_0_GROUP * Q5_0_GROUP;
    const __m256i sixteen = _mm256_set1_epi8(16);
    for (int j = 0; j < grouped; j += Q5_0_GROUP) {
        const uint8_t *group = row + (int64_t)j * Q5_0_BYTES;
        const __m256i planes = _mm256_loadu_si256((const __m256i *)(group + Q5_0_PLANES));
        _mm256_storeu_ps(scales + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)group)));
        #pragma GCC unroll 8
        for (int b = 0; b < Q5_0_GROUP; b++)
            _mm256_storeu_si256((__m256i *)(values + (j + b) * QK),
                                _mm256_sub_epi8(q5_0_group_unsigned(group, planes, b), sixteen));
    }
    for (int j = grouped; j < nb; j++) {
        const uint8_t *block = row + (int64_t)j * Q5_0_BYTES;
        uint16_t h;
        memcpy(&h, block, sizeof h);
        scales[j] = f16_to_f32(h);
        _mm256_storeu_si256((__m256i *)(values + j * QK), _mm256_sub_epi8(q5_0_unsigned(block), sixteen));
    }
#else
    for (int j = 0; j < nb; j++) {
        uint8_t u[QK];
        scales[j] = q5_0_block(row, nb, j, u);
        for (int i = 0; i < QK; i++) values[j * QK + i] = (int8_t)(u[i] - 16);
    }
#endif
}

/* ---- Q5_0 from UNPACK_ROWS activation rows on (prefill): panels of Q5_0_PANEL = 8 weight
   rows, unpacked once per call so that a vector lane is a weight row. Per block j of a panel:
   8 vectors of 32 bytes, vector g holding the unsigned values u = nibble + 16 * bit of k = 4g .. 4g+3
   for each of the 8 rows in turn (byte 4r + i: row r, k = 4g + i), then the 8 rows' scales.
   Against such a vector, 4 bytes of an activation row broadcast to every lane give each lane
   (row) its own 4 products: one vpmaddubsw makes 32 useful products where the per-row tiles'
   one per row and block also needs a vpmaddwd, a conversion and two float operations. Here
   the sums stay integer for the whole block (int16 over half a block, pairs of at most
   2 * 31 * 127, four summed < 2^15; then int32), and a block's float work (convert, scale,
   accumulate) is one instruction each for 8 rows. Lanes are rows, so there is no horizontal
   sum at the end either. */
#define Q5_0_PANEL 8

/* Rows w[0 .. nr) (regrouped, nb blocks each) -> panel [nb][8][32] bytes, scales [nb][8]; the
   lanes of rows past nr are zero (they then add nothing). */
static void q5_0_unpack_panel(const uint8_t *w, int nr, int nb, uint8_t *panel, float *scales) {
    const int64_t row = (int64_t)nb * Q5_0_BYTES;
#ifdef QK_AVX2
    const int grouped = nb / Q5_0_GROUP * Q5_0_GROUP;
    for (int j = 0; j < grouped; j += Q5_0_GROUP) {
        __m256i d[Q5_0_PANEL]; /* the rows' 8 scales (floats), then the blocks' */
        for (int r = 0; r < Q5_0_PANEL; r++)
            d[r] = r < nr ? _mm256_castps_si256(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + r * row + (int64_t)j * Q5_0_BYTES))))
                          : _mm256_setzero_si256();
        transpose_8x8_epi32(d);
        #pragma GCC unroll 8
        for (int b = 0; b < Q5_0_GROUP; b++) {
            __m256i u[Q5_0_PANEL];
            for (int r = 0; r < Q5_0_PANEL; r++) {
                const uint8_t *group = w + r * row + (int64_t)j * Q5_0_BYTES;
                u[r] = r < nr ? q5_0_group_unsigned(group, _mm256_loadu_si256((const __m256i *)(group + Q5_0_PLANES)), b)
                              : _mm256_setzero_si256();
            }
            transpose_8x8_epi32(u);
            for (int g = 0; g < 8; g++) _mm256_storeu_si256((__m256i *)(panel + (int64_t)(j + b) * 256 + 32 * g), u[g]);
            _mm256_storeu_si256((__m256i *)(scales + (j + b) * Q5_0_PANEL), d[b]);
        }
    }
    for (int j = grouped; j < nb; j++) { /* the blocks kept as stored */
        __m256i u[Q5_0_PANEL];
        for (int r = 0; r < Q5_0_PANEL; r++) {
            u[r] = _mm256_setzero_si256();
            scales[j * Q5_0_PANEL + r] = 0.f;
            if (r >= nr) continue;
            const uint8_t *block = w + r * row + (int64_t)j * Q5_0_BYTES;
            uint16_t h;
            memcpy(&h, block, sizeof h);
            u[r] = q5_0_unsigned(block);
            scales[j * Q5_0_PANEL + r] = f16_to_f32(h);
        }
        transpose_8x8_epi32(u);
        for (int g = 0; g < 8; g++) _mm256_storeu_si256((__m256i *)(panel + (int64_t)j * 256 + 32 * g), u[g]);
    }
#else
    memset(panel, 0, (size_t)nb * 256);
    for (int j = 0; j < nb; j++)
        for (int r = 0; r < Q5_0_PANEL; r++) {
            uint8_t u[QK];
            scales[j * Q5_0_PANEL + r] = r < nr ? q5_0_block(w + r * row, nb, j, u) : 0.f;
            if (r < nr)
                for (int k = 0; k < QK; k++) panel[(int64_t)j * 256 + 32 * (k / 4) + 4 * r + k % 4] = u[k];
        }
#endif
}

/* out[m][r] = sum_j d[r][j] xs[m][j] (u[r] . xq[m] - 16 sum(xq[m]) over block j), for the 8
   rows of an unpacked panel and mr (<= 4) activation rows; xsum: 16 sum(xq) per (row, block).
   The block's integer sum is exact; then one float multiply and one FMA per block, in order. */
static inline __attribute__((always_inline)) void q5_0_panel_tile(const uint8_t *panel, const float *scales,
                                                                  const int8_t *xq, const float *xs,
                                                                  const int32_t *xsum, int K, int mr,
                                                                  float out[][Q5_0_PANEL]) {
    const int nb = K / QK;
#ifdef QK_AVX2
    __m256 acc[4];
    for (int m = 0; m < 4; m++) acc[m] = _mm256_setzero_ps();
    for (int j = 0; j < nb; j++) {
        const uint8_t *p = panel + (int64_t)j * 256;
        __m256i sum[4], pairs[4];
        for (int m = 0; m < mr; m++) sum[m] = pairs[m] = _mm256_setzero_si256();
        #pragma GCC unroll 8
        for (int g = 0; g < 8; g++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 32 * g));
            for (int m = 0; m < mr; m++) {
                const __m256i x = broadcast_4_bytes(xq + (int64_t)m * K + j * QK + 4 * g);
#ifdef QK_AVX512
                sum[m] = _mm256_dpbusd_epi32(sum[m], v, x); /* 4 products into int32 at once */
#else
                pairs[m] = _mm256_add_epi16(pairs[m], _mm256_maddubs_epi16(v, x));
                IN_REGISTER(pairs[m]);
#endif
            }
#ifndef QK_AVX512
            if (g % 4 == 3) /* four pair sums at most 4 * 2 * 31 * 127 < 2^15: then into int32 */
                for (int m = 0; m < mr; m++) {
                    sum[m] = _mm256_add_epi32(sum[m], _mm256_madd_epi16(pairs[m], _mm256_set1_epi16(1)));
                    pairs[m] = _mm256_setzero_si256();
                }
#endif
        }
        const __m256 d = _mm256_loadu_ps(scales + j * Q5_0_PANEL);
        for (int m = 0; m < mr; m++) {
            const __m256i s = _mm256_sub_epi32(sum[m], _mm256_set1_epi32(xsum[m * nb + j]));
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, broadcast_load(xs + m * nb + j)), acc[m]);
        }
    }
    for (int m = 0; m < mr; m++) _mm256_storeu_ps(out[m], acc[m]);
#else
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < Q5_0_PANEL; r++) {
            float total = 0.f;
            for (int j = 0; j < nb; j++) {
                int32_t s = -xsum[m * nb + j];
                for (int k = 0; k < QK; k++)
                    s += panel[(int64_t)j * 256 + 32 * (k / 4) + 4 * r + k % 4] * xq[(int64_t)m * K + j * QK + k];
                total = fmaf((float)s, scales[j * Q5_0_PANEL + r] * xs[m * nb + j], total);
            }
            out[m][r] = total;
        }
#endif
}

/* y[m, n] = sum_k x[m, k] * w[n, k], w as regrouped Q5_0 rows ([N, K / 32] blocks, q5_0_pack),
   the activations quantized to int8 in blocks of QK (aligned with the weight blocks). K a
   multiple of 32. Returns 0, or -1 when out of memory. */
int q5_0_linear_q8(const float *x, const uint8_t *w, float *y, int M, int N, int K) {
#ifdef QK_AMX
    if (M >= AMX_MIN_ROWS && !row_invariant) return amx_linear(x, w, 1, NULL, y, M, N, K);
#endif
    const int nb = K / QK;
    const int64_t row = (int64_t)nb * Q5_0_BYTES;
    int8_t *xq = malloc((size_t)M * K);
    float *xs = malloc(sizeof(float) * (size_t)M * nb);
    int32_t *sums = malloc(sizeof(int32_t) * (size_t)M * nb); /* 16 sum(xq) per (row, block): the -16 of w = (u - 16) d */
    if (!xq || !xs || !sums) { free(xq); free(xs); free(sums); return -1; }
    #pragma omp parallel for if (M > 8)
    for (int m = 0; m < M; m++) {
        quantize_row_q8(x + (int64_t)m * K, K, xq + (int64_t)m * K, xs + (int64_t)m * nb);
        for (int j = 0; j < nb; j++) {
            int32_t sum = 0;
            for (int i = 0; i < QK; i++) sum += xq[(int64_t)m * K + j * QK + i];
            sums[(int64_t)m * nb + j] = 16 * sum;
        }
    }
    if (M >= UNPACK_ROWS && !row_invariant) {
        /* Many rows (prefill): each panel of 8 weight rows unpacked once, then every activation
           row against it, PANEL_MT at a time (q5_0_panel_tile). */
        int failed = 0;
        #pragma omp parallel
        {
            uint8_t *panel = malloc((size_t)nb * 256);
            float *scales = malloc(sizeof(float) * Q5_0_PANEL * nb);
            if (!panel || !scales) {
                #pragma omp atomic write
                failed = 1;
            }
            #pragma omp for schedule(static)
            for (int b = 0; b < (N + Q5_0_PANEL - 1) / Q5_0_PANEL; b++) {
                if (!panel || !scales) continue;
                const int n0 = b * Q5_0_PANEL, nr = N - n0 < Q5_0_PANEL ? N - n0 : Q5_0_PANEL;
                q5_0_unpack_panel(w + n0 * row, nr, nb, panel, scales);
                for (int m0 = 0; m0 < M; m0 += PANEL_MT) {
                    const int mr = M - m0 < PANEL_MT ? M - m0 : PANEL_MT;
                    const int8_t *xqm = xq + (int64_t)m0 * K;
                    const float *xsm = xs + (int64_t)m0 * nb;
                    const int32_t *sm = sums + (int64_t)m0 * nb;
                    float out[PANEL_MT][Q5_0_PANEL];
                    if (mr == PANEL_MT) q5_0_panel_tile(panel, scales, xqm, xsm, sm, K, PANEL_MT, out);
                    else q5_0_panel_tile(panel, scales, xqm, xsm, sm, K, mr, out);
                    for (int m = 0; m < mr; m++) memcpy(y + (int64_t)(m0 + m) * N + n0, out[m], sizeof(float) * nr);
                }
            }
            free(panel);
            free(scales);
        }
        free(xq);
        free(xs);
        free(sums);
        return failed ? -1 : 0;
    }
    /* Fewer rows (decode): the corrections as floats, c = 16 xs sum(xq) per (row, block). */
    float *c = malloc(sizeof(float) * (size_t)M * nb);
    if (!c) { free(xq); free(xs); free(sums); return -1; }
    for (int64_t i = 0; i < (int64_t)M * nb; i++) c[i] = xs[i] * (float)sums[i];
    free(sums);
    int m8 = 0;  /* rows [0, m8) go 8 at a time through q5_0_row_x8 */
    float *xs8 = NULL;
#ifdef QK_AVX2
    m8 = M / 8 * 8;
    if (m8) {
        xs8 = malloc(sizeof(float) * (size_t)m8 * nb);
        if (!xs8) { free(xq); free(xs); free(c); return -1; }
        for (int g = 0; g < m8 / 8; g++)
            for (int j = 0; j < nb; j++)
                for (int i = 0; i < 8; i++) xs8[((int64_t)g * nb + j) * 8 + i] = xs[(int64_t)(8 * g + i) * nb + j];
    }
#endif
    const int blocks = (N + 1) / 2;
    #pragma omp parallel for schedule(static)
    for (int b = 0; b < blocks; b++) {
        const int n0 = b * 2, nr = N - n0 < 2 ? N - n0 : 2;
        const uint8_t *wb = w + n0 * row;
#ifdef QK_AVX2
        for (int g = 0; g < m8 / 8; g++)
            for (int r = 0; r < nr; r++) {
                float out[8];
                q5_0_row_x8(xq + (int64_t)8 * g * K, xs8 + (int64_t)g * nb * 8, c + (int64_t)8 * g * nb,
                            wb + r * row, K, out);
                for (int m = 0; m < 8; m++) y[(int64_t)(8 * g + m) * N + n0 + r] = out[m];
            }
#endif
        for (int m0 = m8; m0 < M; m0 += 4) {
            const int mr = M - m0 < 4 ? M - m0 : 4;
            const int8_t *xqm = xq + (int64_t)m0 * K;
            const float *xsm = xs + (int64_t)m0 * nb, *cm = c + (int64_t)m0 * nb;
            float out[4][2];
            if (nr == 2 && mr == 4) q5_0_tile(xqm, xsm, cm, wb, K, 2, 4, out);
            else if (nr == 2 && mr == 3) q5_0_tile(xqm, xsm, cm, wb, K, 2, 3, out);
            else if (nr == 2 && mr == 2) q5_0_tile(xqm, xsm, cm, wb, K, 2, 2, out);
            else if (nr == 2 && mr == 1) q5_0_tile(xqm, xsm, cm, wb, K, 2, 1, out);
            else q5_0_tile(xqm, xsm, cm, wb, K, nr, mr, out);
            for (int m = 0; m < mr; m++)
                for (int r = 0; r < nr; r++) y[(int64_t)(m0 + m) * N + n0 + r] = out[m][r];
        }
    }
    free(xq);
    free(xs);
    free(c);
    free(xs8);
    return 0;
}

/* Regrouped Q5_0 rows -> float32 [N, K] (for a float GEMM). */
void q5_0_dequantize(const uint8_t *w, float *out, int N, int K) {
    const int nb = K / QK;
    #pragma omp parallel
    {
        int8_t *values = malloc((size_t)K);
        float *scales = malloc(sizeof(float) * nb);
        #pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            if (!values || !scales) continue;  /* checked by the caller: out stays as it was */
            q5_0_unpack_row(w + (int64_t)n * nb * Q5_0_BYTES, nb, values, scales);
            float *o = out + (int64_t)n * K;
            for (int k = 0; k < K; k++) o[k] = (float)values[k] * scales[k / QK];
        }
        free(values);
        free(scales);
    }
}

/* Rows of GGUF Q8_0 blocks (34 bytes per 32 values: an fp16 scale d, then 32 int8 q) -> float32
   [N, K], w = q d in float32 as gguf's numpy code computes it. Loading only (Q8_0 matrices
   become int8 with one scale a row): ~6x faster than that code. */
void q8_0_dequantize(const uint8_t *w, float *out, int N, int K) {
    const int nb = K / QK;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int j = 0; j < nb; j++) {
            const uint8_t *block = w + ((int64_t)n * nb + j) * 34;
            uint16_t h;
            memcpy(&h, block, sizeof h);
            const float d = f16_to_f32(h);
            const int8_t *q = (const int8_t *)(block + 2);
            float *o = out + (int64_t)n * K + j * QK;
            for (int i = 0; i < QK; i++) o[i] = (float)q[i] * d;
        }
}

/* ---- AMX-INT8 (Sapphire Rapids and later): many activation rows against panels of 32 weight
   rows. Per block of 32 values, one tile op multiplies 16 activation rows by 16 weight rows
   (tdpbssd: signed x signed bytes, exact int32 sums), then the int32 products are scaled by the
   block's activation scale (and Q5_0's weight scale) and summed in float, as the other paths do
   per block. The weights of a panel are repacked once per call into the tiles' layout (B row r
   holds, for each of 16 weight rows, the 4 bytes k = 4r..4r+3); Q5_0 rows are unpacked to int8
   first. The activations are padded to a multiple of 16 rows with zeros. */

#include <sys/syscall.h>
#include <unistd.h>

/* Ask the kernel for the AMX tile state (Linux >= 5.16): 0 when granted, or when this build has
   no AMX code; the caller falls back to another variant otherwise. */
int qk_amx_init(void) {
#if defined(QK_AMX) && !defined(QK_EMULATE_AMX)
    const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1;
#else
    return 0;
#endif
}

#ifdef QK_AMX
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* Tiles: 0, 1 the int32 products of 16 activation rows by weight rows 0-15 / 16-31 of the panel;
   2 the activations (16 rows x 32 bytes); 3, 4 the packed weights (8 rows x 64 bytes each). */
static void amx_configure(void) {
    amx_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = cfg.rows[1] = cfg.rows[2] = 16;
    cfg.colsb[0] = cfg.colsb[1] = 64;
    cfg.colsb[2] = 32;
    cfg.rows[3] = cfg.rows[4] = 8;
    cfg.colsb[3] = cfg.colsb[4] = 64;
    _tile_loadconfig(&cfg);
}

/* w: nr (<= 32) int8 rows of K -> packed[j][t][r][n * 4 + i] = w[16 t + n][32 j + 4 r + i] (0 past nr). */
static void amx_pack(const int8_t *w, int nr, int K, int8_t *packed) {
    const int nb = K / QK;
    memset(packed, 0, (size_t)nb * 2 * 512);
    for (int row = 0; row < nr; row++) {
        const int t = row / 16, n = row % 16;
        for (int j = 0; j < nb; j++)
            for (int r = 0; r < 8; r++)
                memcpy(packed + ((int64_t)(j * 2 + t) * 8 + r) * 64 + n * 4, w + (int64_t)row * K + j * QK + r * 4, 4);
    }
}

static int amx_linear(const float *x, const void *w, int q5_0, const uint16_t *scale, float *y, int M, int N, int K) {
    const int nb = K / QK, Mp = (M + 15) / 16 * 16;
    int8_t *xq = calloc((size_t)Mp * K, 1);
    float *xs = calloc((size_t)Mp * nb, sizeof(float));
    if (!xq || !xs) { free(xq); free(xs); return -1; }
#pragma omp parallel for
    for (int m = 0; m < M; m++) quantize_row_q8(x + (int64_t)m * K, K, xq + (int64_t)m * K, xs + (int64_t)m * nb);
    int failed = 0;
#pragma omp parallel
    {
        int8_t *packed = malloc((size_t)nb * 2 * 512), *wq = q5_0 ? malloc((size_t)32 * K) : NULL;
        float *wd = q5_0 ? malloc(sizeof(float) * 32 * nb) : NULL;     /* [32, nb] */
        float *wdt = q5_0 ? calloc((size_t)nb * 32, sizeof(float)) : NULL; /* [nb, 32] */
        float acc[16][32];
        int32_t products[16][32];
        const int ok = packed && (!q5_0 || (wq && wd && wdt));
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
        if (ok) amx_configure();
#pragma omp for schedule(static)
        for (int panel = 0; panel < (N + 31) / 32; panel++) {
            if (!ok) continue;
            const int n0 = panel * 32, nr = N - n0 < 32 ? N - n0 : 32;
            const int8_t *rows = (const int8_t *)w + (int64_t)n0 * K;
            if (q5_0) {
                for (int r = 0; r < nr; r++)
                    q5_0_unpack_row((const uint8_t *)w + (int64_t)(n0 + r) * nb * Q5_0_BYTES, nb, wq + (int64_t)r * K,
                                    wd + r * nb);
                for (int j = 0; j < nb; j++)
                    for (int r = 0; r < 32; r++) wdt[j * 32 + r] = r < nr ? wd[r * nb + j] : 0.f;
                rows = wq;
            }
            amx_pack(rows, nr, K, packed);
            for (int m0 = 0; m0 < Mp; m0 += 16) {
                for (int m = 0; m < 16; m++)
                    for (int n = 0; n < 32; n++) acc[m][n] = 0.f;
                for (int j = 0; j < nb; j++) {
                    _tile_loadd(2, xq + (int64_t)m0 * K + j * QK, K);
                    _tile_loadd(3, packed + (int64_t)(j * 2) * 512, 64);
                    _tile_loadd(4, packed + (int64_t)(j * 2 + 1) * 512, 64);
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_dpbssd(0, 2, 3);
                    _tile_dpbssd(1, 2, 4);
                    _tile_stored(0, &products[0][0], 128);
                    _tile_stored(1, &products[0][16], 128);
                    for (int m = 0; m < 16; m++) {
                        const __m512 sx = _mm512_set1_ps(xs[(int64_t)(m0 + m) * nb + j]);
                        for (int half = 0; half < 2; half++) {
                            __m512 p = _mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)&products[m][16 * half]));
                            if (q5_0) p = _mm512_mul_ps(p, _mm512_loadu_ps(wdt + j * 32 + 16 * half));
                            _mm512_storeu_ps(&acc[m][16 * half],
                                             _mm512_fmadd_ps(p, sx, _mm512_loadu_ps(&acc[m][16 * half])));
                        }
                    }
                }
                for (int m = 0; m < 16 && m0 + m < M; m++)
                    for (int r = 0; r < nr; r++)
                        y[(int64_t)(m0 + m) * N + n0 + r] = acc[m][r] * (scale ? bf16_to_f32(scale[n0 + r]) : 1.f);
            }
        }
        if (ok) _tile_release();
        free(packed);
        free(wq);
        free(wd);
        free(wdt);
    }
    free(xq);
    free(xs);
    return failed ? -1 : 0;
}
#endif
