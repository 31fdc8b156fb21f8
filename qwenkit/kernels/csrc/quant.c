/* Quantized matmuls: int8 weights (one bfloat16 scale per output row), and GGUF Q5_0 blocks
   (22 bytes per 32 values; 8 rows interleaved at load, the same size).

   As llama.cpp does, the activations are first quantized to int8 in blocks of 32 values (QK, one
   float scale each); the products are integer dot products (AVX2 `maddubs` + `madd`: 32
   multiply-adds in two instructions), summed in float per block. Each weight is read once per
   call and used for every activation row: int8 in tiles of 4 weight rows x 2 activation rows;
   Q5_0 in panels of 8 weight rows, a vector lane a row, decoded in registers below UNPACK_ROWS
   activation rows and unpacked once per call from there on, the same arithmetic for every row
   either way. Below UNPACK_ROWS rows (and for Q5_0 at any count, AMX aside) a row's result does
   not depend on the other rows of the call. OpenMP over blocks of output rows. Without AVX2 the
   same arithmetic runs as plain C. */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

#ifdef QK_AMX
#define AMX_MIN_ROWS 16 /* from a full tile of activation rows on, the matmuls run on AMX tiles */
static int amx_linear(const float *x, const void *w, int q5_0, const uint16_t *scale, float *y, int M, int N, int K);
#endif

#ifndef UNPACK_ROWS
#define UNPACK_ROWS 16 /* from this many activation rows on, Q5_0 panels are unpacked first (AVX2) */
#endif
#ifndef PANEL_MT
#define PANEL_MT 3 /* activation rows a tile of the Q5_0 panels (<= 4; 2 and 4 measured 0-5% slower) */
#endif

/* While set (qk_set_row_invariant), the matmuls below take one path whatever the number of
   activation rows M (no AMX tiles): each row's result is then the same alone or among any others
   (--deterministic). The paths left keep one order of operations per (activation row, weight
   row): the int8 tiles, and Q5_0's panels (decoded in registers or unpacked first, the same
   numbers). */
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
    #pragma omp parallel for if (M > 8) schedule(dynamic, qk_chunk(M))
    for (int m = 0; m < M; m++) quantize_row_q8(x + (int64_t)m * K, K, xq + (int64_t)m * K, xs + (int64_t)m * nb);
    const int blocks = (N + 3) / 4;
    #pragma omp parallel for schedule(dynamic, qk_chunk(blocks))
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
   The kernels take the rows interleaved at load 8 at a time (q5_0_pack; N a multiple of 8, the
   same bytes): per panel of Q5_0_PANEL = 8 rows and block j, Q5_0_PANEL_BYTES = 176 bytes, the 8
   rows' fp16 scales, then 4 x 32 bytes of nibbles (vector g, byte 4r + v: value 4g + v of row r
   in the low nibble, value 4(g + 4) + v in the high one), then 32 bytes of high bits (byte
   4r + v, bit q: value 4q + v of row r). Vector q of a block's unsigned values u = nibble + 16 *
   bit decodes in 4-5 operations (q5_0_unsigned) and holds each row's values 4q .. 4q + 3 in a
   lane: against 4 bytes of an activation row broadcast to every lane, one vpmaddubsw makes 32
   products for 8 rows. The sums stay integer for the whole block (int16 over half a block: pairs
   of at most 2 * 31 * 127, four summed < 2^15; then int32; exact), and a block's float work
   (convert, scale, accumulate) is one instruction each for 8 rows, with no horizontal sums.
   Every activation row takes the same operations whatever the number of rows (decoded in
   registers below UNPACK_ROWS rows, unpacked once per call from there on), so a row's result
   never depends on the other rows of the call. Against the previous layout (rows one at a time,
   each group of 8 blocks regrouped) on the default model's shapes: 0.59-0.92x the time at one
   row, 0.54-0.63x at 8 (docs/decode.md). */

#define Q5_0_BYTES 22
#define Q5_0_PANEL 8
#define Q5_0_PANEL_BYTES (Q5_0_PANEL * Q5_0_BYTES) /* a block of a panel */
#define Q5_0_NIBBLES 16                            /* where its nibbles start (after the 8 scales) */
#define Q5_0_PLANES 144                            /* where its high bits start */

/* Value k of row r in a panel's block pb, as u = nibble + 16 * bit in [0, 31]. */
static inline uint8_t q5_0_value(const uint8_t *pb, int r, int k) {
    const int q = k / 4, i = 4 * r + k % 4;
    const int nibble = (pb[Q5_0_NIBBLES + 32 * (q & 3) + i] >> (q < 4 ? 0 : 4)) & 0x0f;
    return (uint8_t)(nibble | (((pb[Q5_0_PLANES + i] >> q) & 1) << 4));
}

/* Value k of a block as stored in the file, the same u. */
static inline uint8_t q5_0_stored_value(const uint8_t *block, int k) {
    uint32_t qh;
    memcpy(&qh, block + 2, sizeof qh);
    const int nibble = k < 16 ? block[6 + k] & 0x0f : block[6 + k - 16] >> 4;
    return (uint8_t)(nibble | (((qh >> k) & 1) << 4));
}

#ifdef QK_AVX2
/* The 32 values of a stored block as unsigned bytes u (w = (u - 16) d). */
static inline __m256i q5_0_stored_unsigned(const uint8_t *block) {
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

/* Vector q of a panel's block pb (q a constant once the caller's loop is unrolled): lane r holds
   u of row r's values 4q .. 4q + 3. planes: the block's 32 bytes of high bits. */
static inline __attribute__((always_inline)) __m256i q5_0_unsigned(const uint8_t *pb, __m256i planes, int q) {
    const __m256i pair = _mm256_loadu_si256((const __m256i *)(pb + Q5_0_NIBBLES + 32 * (q & 3)));
    const __m256i nibbles = q < 4 ? pair : _mm256_srli_epi16(pair, 4);
    const __m256i high = q < 4 ? _mm256_slli_epi16(planes, 4 - q) : _mm256_srli_epi16(planes, q - 4);
    return _mm256_or_si256(_mm256_and_si256(nibbles, _mm256_set1_epi8(0x0f)),
                           _mm256_and_si256(high, _mm256_set1_epi8(0x10)));
}
#endif

/* Rows of a file's Q5_0 blocks [N, K / 32] -> the kernels' layout, into out (not overlapping);
   N a multiple of Q5_0_PANEL. */
void q5_0_pack(const uint8_t *stored, uint8_t *out, int N, int K) {
    const int nb = K / QK;
    const int64_t row = (int64_t)nb * Q5_0_BYTES;
    #pragma omp parallel for schedule(dynamic, qk_chunk(N / Q5_0_PANEL))
    for (int p = 0; p < N / Q5_0_PANEL; p++) {
        const uint8_t *src = stored + (int64_t)p * Q5_0_PANEL * row;
        uint8_t *dst = out + (int64_t)p * Q5_0_PANEL * row;
        for (int j = 0; j < nb; j++) {
            uint8_t *pb = dst + (int64_t)j * Q5_0_PANEL_BYTES;
            for (int r = 0; r < Q5_0_PANEL; r++) memcpy(pb + 2 * r, src + r * row + (int64_t)j * Q5_0_BYTES, 2);
#ifdef QK_AVX2
            /* each row's block decoded, then transposed so that vector q holds dword q of every row */
            const __m256i low4 = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);
            __m256i u[Q5_0_PANEL], planes = _mm256_setzero_si256();
            for (int r = 0; r < Q5_0_PANEL; r++) u[r] = q5_0_stored_unsigned(src + r * row + (int64_t)j * Q5_0_BYTES);
            transpose_8x8_epi32(u);
            for (int q = 0; q < 8; q++) {
                const __m256i bit = _mm256_and_si256(_mm256_srli_epi16(u[q], 4), one); /* bit 0 of each byte */
                planes = _mm256_or_si256(planes, _mm256_sll_epi16(bit, _mm_cvtsi32_si128(q)));
            }
            for (int g = 0; g < 4; g++)
                _mm256_storeu_si256((__m256i *)(pb + Q5_0_NIBBLES + 32 * g),
                                    _mm256_or_si256(_mm256_and_si256(u[g], low4),
                                                    _mm256_slli_epi16(_mm256_and_si256(u[g + 4], low4), 4)));
            _mm256_storeu_si256((__m256i *)(pb + Q5_0_PLANES), planes);
#else
            memset(pb + Q5_0_NIBBLES, 0, Q5_0_PANEL_BYTES - Q5_0_NIBBLES);
            for (int r = 0; r < Q5_0_PANEL; r++)
                for (int k = 0; k < QK; k++) {
                    const int u = q5_0_stored_value(src + r * row + (int64_t)j * Q5_0_BYTES, k);
                    const int q = k / 4, i = 4 * r + k % 4;
                    pb[Q5_0_NIBBLES + 32 * (q & 3) + i] |= (uint8_t)((u & 0x0f) << (q < 4 ? 0 : 4));
                    pb[Q5_0_PLANES + i] |= (uint8_t)((u >> 4) << q);
                }
#endif
        }
    }
}

/* A panel's nb blocks -> unpacked [nb][8 vectors][32] bytes u (vector q, byte 4r + v: value
   4q + v of row r) and float scales [nb][8]. */
static void q5_0_unpack_panel(const uint8_t *w, int nb, uint8_t *panel, float *scales) {
    for (int j = 0; j < nb; j++) {
        const uint8_t *pb = w + (int64_t)j * Q5_0_PANEL_BYTES;
#ifdef QK_AVX2
        const __m256i planes = _mm256_loadu_si256((const __m256i *)(pb + Q5_0_PLANES));
        _mm256_storeu_ps(scales + j * Q5_0_PANEL, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)pb)));
        #pragma GCC unroll 8
        for (int q = 0; q < 8; q++)
            _mm256_storeu_si256((__m256i *)(panel + (int64_t)j * 256 + 32 * q), q5_0_unsigned(pb, planes, q));
#else
        for (int r = 0; r < Q5_0_PANEL; r++) {
            uint16_t h;
            memcpy(&h, pb + 2 * r, sizeof h);
            scales[j * Q5_0_PANEL + r] = f16_to_f32(h);
            for (int k = 0; k < QK; k++) panel[(int64_t)j * 256 + 32 * (k / 4) + 4 * r + k % 4] = q5_0_value(pb, r, k);
        }
#endif
    }
}

/* A panel's 8 rows -> int8 values [8][K] in [-16, 15] (row r at values + r * K) and scales [8][nb]
   (row r at scales + r * nb). AVX2: each block's 8 vectors decoded and transposed in registers;
   plain C: through q5_0_unpack_panel, into panel and panel_scales (room for it). */
static void q5_0_unpack_rows(const uint8_t *w, int nb, int8_t *values, float *scales, uint8_t *panel,
                             float *panel_scales) {
#ifdef QK_AVX2
    (void)panel;
    (void)panel_scales;
    for (int j = 0; j < nb; j++) {
        const uint8_t *pb = w + (int64_t)j * Q5_0_PANEL_BYTES;
        const __m256i planes = _mm256_loadu_si256((const __m256i *)(pb + Q5_0_PLANES));
        float d[Q5_0_PANEL];
        _mm256_storeu_ps(d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)pb)));
        __m256i u[Q5_0_PANEL]; /* vector q: dword q of every row; transposed: row r's 32 values in order */
        #pragma GCC unroll 8
        for (int q = 0; q < 8; q++) u[q] = q5_0_unsigned(pb, planes, q);
        transpose_8x8_epi32(u);
        for (int r = 0; r < Q5_0_PANEL; r++) {
            _mm256_storeu_si256((__m256i *)(values + (int64_t)r * nb * QK + j * QK),
                                _mm256_sub_epi8(u[r], _mm256_set1_epi8(16)));
            scales[r * nb + j] = d[r];
        }
    }
#else
    q5_0_unpack_panel(w, nb, panel, panel_scales);
    for (int r = 0; r < Q5_0_PANEL; r++)
        for (int j = 0; j < nb; j++) {
            scales[r * nb + j] = panel_scales[j * Q5_0_PANEL + r];
            for (int k = 0; k < QK; k++)
                values[(int64_t)r * nb * QK + j * QK + k] = (int8_t)(panel[(int64_t)j * 256 + 32 * (k / 4) + 4 * r + k % 4] - 16);
        }
#endif
}

#define Q5_0_HALF_SUM(pairs, sum)                                                                    \
    do { /* four pair sums at most 4 * 2 * 31 * 127 < 2^15: then into int32 */                      \
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));                  \
        pairs = _mm256_setzero_si256();                                                              \
    } while (0)

/* out[m][r] = sum_j d[r][j] xs[m][j] (u[r] . xq[m] - 16 sum(xq[m]) over block j), for the 8 rows
   of an unpacked panel and mr (<= 4) activation rows; xsum: 16 sum(xq) per (row, block). The
   block's integer sum is exact; then one float multiply and one FMA per block, in order. */
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
            if (g % 4 == 3)
                for (int m = 0; m < mr; m++) Q5_0_HALF_SUM(pairs[m], sum[m]);
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

#ifdef QK_AVX2
/* The same numbers as q5_0_panel_tile, for a panel as stored (decoded in registers, block by
   block, nothing written back): below UNPACK_ROWS activation rows, where unpacking the panel
   first would cost more than it saves. */
static inline __attribute__((always_inline)) void q5_0_tile(const uint8_t *w, const int8_t *xq, const float *xs,
                                                            const int32_t *xsum, int K, int mr,
                                                            float out[][Q5_0_PANEL]) {
    const int nb = K / QK;
    __m256 acc[4];
    for (int m = 0; m < 4; m++) acc[m] = _mm256_setzero_ps();
    for (int j = 0; j < nb; j++) {
        const uint8_t *pb = w + (int64_t)j * Q5_0_PANEL_BYTES;
        prefetch_ahead(w, (int64_t)j * Q5_0_PANEL_BYTES, Q5_0_PANEL_BYTES);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)pb));
        const __m256i planes = _mm256_loadu_si256((const __m256i *)(pb + Q5_0_PLANES));
        __m256i u[8];
        #pragma GCC unroll 8
        for (int q = 0; q < 8; q++) u[q] = q5_0_unsigned(pb, planes, q);
        for (int m = 0; m < mr; m++) {
            const int8_t *x = xq + (int64_t)m * K + j * QK;
            __m256i sum = _mm256_setzero_si256();
#ifndef QK_AVX512
            __m256i pairs = _mm256_setzero_si256();
#endif
            #pragma GCC unroll 8
            for (int q = 0; q < 8; q++) {
#ifdef QK_AVX512
                sum = _mm256_dpbusd_epi32(sum, u[q], broadcast_4_bytes(x + 4 * q));
#else
                pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(u[q], broadcast_4_bytes(x + 4 * q)));
                IN_REGISTER(pairs); /* 2-5% at 4 and 8 rows */
                if (q % 4 == 3) Q5_0_HALF_SUM(pairs, sum);
#endif
            }
            const __m256i s = _mm256_sub_epi32(sum, _mm256_set1_epi32(xsum[m * nb + j]));
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, broadcast_load(xs + m * nb + j)), acc[m]);
        }
    }
    for (int m = 0; m < mr; m++) _mm256_storeu_ps(out[m], acc[m]);
}
#endif

/* y[m, n] = sum_k x[m, k] * w[n, k], w as Q5_0 panels (q5_0_pack; N a multiple of 8), the
   activations quantized to int8 in blocks of QK (aligned with the weight blocks). K a multiple
   of 32. Returns 0, or -1 when out of memory. */
int q5_0_linear_q8(const float *x, const uint8_t *w, float *y, int M, int N, int K) {
#ifdef QK_AMX
    if (M >= AMX_MIN_ROWS && !row_invariant) return amx_linear(x, w, 1, NULL, y, M, N, K);
#endif
    const int nb = K / QK, panels = N / Q5_0_PANEL;
    const int64_t panel_bytes = (int64_t)nb * Q5_0_PANEL_BYTES;
    int8_t *xq = malloc((size_t)M * K);
    float *xs = malloc(sizeof(float) * (size_t)M * nb);
    int32_t *sums = malloc(sizeof(int32_t) * (size_t)M * nb); /* 16 sum(xq) per (row, block): the -16 of w = (u - 16) d */
    if (!xq || !xs || !sums) { free(xq); free(xs); free(sums); return -1; }
    #pragma omp parallel for if (M > 8) schedule(dynamic, qk_chunk(M))
    for (int m = 0; m < M; m++) {
        quantize_row_q8(x + (int64_t)m * K, K, xq + (int64_t)m * K, xs + (int64_t)m * nb);
        for (int j = 0; j < nb; j++) {
            int32_t sum = 0;
            for (int i = 0; i < QK; i++) sum += xq[(int64_t)m * K + j * QK + i];
            sums[(int64_t)m * nb + j] = 16 * sum;
        }
    }
    int failed = 0;
#ifdef QK_AVX2
    if (M < UNPACK_ROWS) {
        #pragma omp parallel for schedule(dynamic, qk_chunk(panels))
        for (int p = 0; p < panels; p++) {
            const uint8_t *wp = w + p * panel_bytes;
            for (int m0 = 0; m0 < M; m0 += 4) {
                const int mr = M - m0 < 4 ? M - m0 : 4;
                const int8_t *xqm = xq + (int64_t)m0 * K;
                const float *xsm = xs + (int64_t)m0 * nb;
                const int32_t *sm = sums + (int64_t)m0 * nb;
                float out[4][Q5_0_PANEL];
                if (mr == 4) q5_0_tile(wp, xqm, xsm, sm, K, 4, out);
                else if (mr == 1) q5_0_tile(wp, xqm, xsm, sm, K, 1, out);
                else q5_0_tile(wp, xqm, xsm, sm, K, mr, out);
                for (int m = 0; m < mr; m++) memcpy(y + (int64_t)(m0 + m) * N + p * Q5_0_PANEL, out[m], sizeof out[m]);
            }
        }
    } else
#endif
    {
        /* Many rows (prefill), or no AVX2: each panel unpacked once, then every activation row
           against it, PANEL_MT at a time. */
        #pragma omp parallel
        {
            uint8_t *panel = malloc((size_t)nb * 256);
            float *scales = malloc(sizeof(float) * Q5_0_PANEL * nb);
            if (!panel || !scales) {
                #pragma omp atomic write
                failed = 1;
            }
            #pragma omp for schedule(dynamic, qk_chunk(panels))
            for (int p = 0; p < panels; p++) {
                if (!panel || !scales) continue;
                q5_0_unpack_panel(w + p * panel_bytes, nb, panel, scales);
                for (int m0 = 0; m0 < M; m0 += PANEL_MT) {
                    const int mr = M - m0 < PANEL_MT ? M - m0 : PANEL_MT;
                    const int8_t *xqm = xq + (int64_t)m0 * K;
                    const float *xsm = xs + (int64_t)m0 * nb;
                    const int32_t *sm = sums + (int64_t)m0 * nb;
                    float out[PANEL_MT][Q5_0_PANEL];
                    if (mr == PANEL_MT) q5_0_panel_tile(panel, scales, xqm, xsm, sm, K, PANEL_MT, out);
                    else q5_0_panel_tile(panel, scales, xqm, xsm, sm, K, mr, out);
                    for (int m = 0; m < mr; m++)
                        memcpy(y + (int64_t)(m0 + m) * N + p * Q5_0_PANEL, out[m], sizeof out[m]);
                }
            }
            free(panel);
            free(scales);
        }
    }
    free(xq);
    free(xs);
    free(sums);
    return failed ? -1 : 0;
}

/* Q5_0 panels (q5_0_pack) -> [N, K] of out_dtype (kernels.h's KV_*: float32 for the loader, the
   prefill's float16 / bfloat16 GEMM's own dtype, rounded as torch's .to() rounds). -1: no memory. */
int q5_0_dequantize(const uint8_t *w, void *out, int N, int K, int out_dtype) {
    const int nb = K / QK;
    int failed = 0;
    #pragma omp parallel
    {
        int8_t *values = malloc((size_t)Q5_0_PANEL * K);
        float *scales = malloc(sizeof(float) * Q5_0_PANEL * nb), *panel_scales = malloc(sizeof(float) * Q5_0_PANEL * nb);
        uint8_t *panel = malloc((size_t)nb * 256);
        float *row = malloc(sizeof(float) * K);
        if (!values || !scales || !panel_scales || !panel || !row) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, qk_chunk(N / Q5_0_PANEL))
        for (int p = 0; p < N / Q5_0_PANEL; p++) {
            if (!values || !scales || !panel_scales || !panel || !row) continue;
            q5_0_unpack_rows(w + (int64_t)p * nb * Q5_0_PANEL_BYTES, nb, values, scales, panel, panel_scales);
            for (int r = 0; r < Q5_0_PANEL; r++) {
                for (int j = 0; j < nb; j++) {
                    const int8_t *v = values + (int64_t)r * K + j * QK;
                    const float d = scales[r * nb + j];
                    for (int i = 0; i < QK; i++) row[j * QK + i] = (float)v[i] * d;
                }
                kv_store(out, (int64_t)(p * Q5_0_PANEL + r) * K, out_dtype, row, K);
            }
        }
        free(values);
        free(scales);
        free(panel_scales);
        free(panel);
        free(row);
    }
    return failed ? -1 : 0;
}

/* Rows 0 .. N - 1 of a matrix, each decoded into float32 values by row(ctx, n, values) -> [N, K]
   of out_dtype (kernels.h's KV_*: float32, or 16-bit rounded as torch's .to() rounds), the rows
   split over the threads. -1: no memory for a row buffer (out left partly written). */
int dequantize_rows(void (*row)(const void *ctx, int n, float *values), const void *ctx, void *out, int N, int K,
                    int out_dtype) {
    int failed = 0;
    #pragma omp parallel
    {
        float *values = malloc(sizeof(float) * K);
        if (!values) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, qk_chunk(N))
        for (int n = 0; n < N; n++) {
            if (!values) continue;
            row(ctx, n, values);
            kv_store(out, (int64_t)n * K, out_dtype, values, K);
        }
        free(values);
    }
    return failed ? -1 : 0;
}

typedef struct {
    const uint8_t *w;
    int nb;
} q8_0_matrix;

/* Row n of GGUF Q8_0 blocks (34 bytes per 32 values: an fp16 scale d, then 32 int8 q): w = q d in
   float32, as gguf's numpy code computes it. */
static void q8_0_row(const void *ctx, int n, float *values) {
    const q8_0_matrix *m = ctx;
    for (int j = 0; j < m->nb; j++) {
        const uint8_t *block = m->w + ((int64_t)n * m->nb + j) * 34;
        uint16_t h;
        memcpy(&h, block, sizeof h);
        const float d = f16_to_f32(h);
        const int8_t *q = (const int8_t *)(block + 2);
        for (int i = 0; i < QK; i++) values[j * QK + i] = (float)q[i] * d;
    }
}

/* Rows of GGUF Q8_0 blocks -> [N, K] of out_dtype. Loading only (Q8_0 matrices become int8 with one
   scale a row): ~6x faster than gguf's code. -1: no memory. */
int q8_0_dequantize(const uint8_t *w, void *out, int N, int K, int out_dtype) {
    const q8_0_matrix m = {w, K / QK};
    return dequantize_rows(q8_0_row, &m, out, N, K, out_dtype);
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
#pragma omp parallel for schedule(dynamic, qk_chunk(M))
    for (int m = 0; m < M; m++) quantize_row_q8(x + (int64_t)m * K, K, xq + (int64_t)m * K, xs + (int64_t)m * nb);
    int failed = 0;
#pragma omp parallel
    {
        int8_t *packed = malloc((size_t)nb * 2 * 512), *wq = q5_0 ? malloc((size_t)32 * K) : NULL;
        float *wd = q5_0 ? malloc(sizeof(float) * 32 * nb) : NULL;     /* [32, nb] */
        float *wdt = q5_0 ? calloc((size_t)nb * 32, sizeof(float)) : NULL; /* [nb, 32] */
        uint8_t *unpacked = q5_0 ? malloc((size_t)nb * 256) : NULL;       /* q5_0_unpack_rows' room */
        float *panel_scales = q5_0 ? malloc(sizeof(float) * Q5_0_PANEL * nb) : NULL;
        float acc[16][32];
        int32_t products[16][32];
        const int ok = packed && (!q5_0 || (wq && wd && wdt && unpacked && panel_scales));
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
        if (ok) amx_configure();
#pragma omp for schedule(dynamic, qk_chunk((N + 31) / 32))
        for (int panel = 0; panel < (N + 31) / 32; panel++) {
            if (!ok) continue;
            const int n0 = panel * 32, nr = N - n0 < 32 ? N - n0 : 32;
            const int8_t *rows = (const int8_t *)w + (int64_t)n0 * K;
            if (q5_0) {
                for (int r = 0; r < nr; r += Q5_0_PANEL) /* N, so nr, a multiple of 8 */
                    q5_0_unpack_rows((const uint8_t *)w + (int64_t)(n0 + r) * nb * Q5_0_BYTES, nb, wq + (int64_t)r * K,
                                     wd + r * nb, unpacked, panel_scales);
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
        free(unpacked);
        free(panel_scales);
    }
    free(xq);
    free(xs);
    return failed ? -1 : 0;
}
#endif
