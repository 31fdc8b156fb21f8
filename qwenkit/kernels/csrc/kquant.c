/* GGUF K-quants multiplied as stored: Q4_K (144 bytes per 256 values), Q5_K (176) and Q6_K (210).

   A super-block of 256 values is 8 blocks of 32, each with its own scale (Q6_K: one per 16
   values) and, for Q4_K / Q5_K, a min: w = d sc u - dmin m (u the 4 or 5 unsigned bits), Q6_K
   w = d sc (u - 32), sc and m small integers. As llama.cpp does for these types (its Q8_K), the
   activations are quantized to int8 per super-block (one float scale per 256 values), so that a
   super-block's product is integer arithmetic: per block, the byte products of unsigned weights
   and signed activations summed in pairs (maddubs), times the block's integer scale and summed
   in pairs again (madd), added up in int32 over the 8 blocks; Q6_K's offset of 32 comes off as
   the integer dot product of its scales with the activations' sums per 16 values. One
   conversion and one fmadd per super-block then take d times the activations' scale. The Q4_K /
   Q5_K mins take one more fmadd: the 8 blocks' dmin m times the activations' sums per block
   (times their scale), in float.

   Below KQ_UNPACK_ROWS activation rows (decode) each super-block of a weight row is decoded once,
   in registers, for up to 8 of them (kq_rows); from there on (prefill) the weight rows are
   unpacked a few super-blocks at a time into a buffer that every activation row then passes over
   (kq_tile). Both give every (activation row, weight row) pair the same operations in the same
   order whatever the number of rows, so a row's result does not depend on the batch.
   kq_dequantize gives the exact float weights where no kernel runs. Plain C takes the same
   arithmetic without AVX2. */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

#define QK_K 256
#ifndef KQ_STEP
#define KQ_STEP(mr) ((mr) == 1 ? 4 : (mr) == 2 ? 2 : 1) /* weight rows at a time, for mr activation rows */
#endif
#ifndef KQ_UNPACK_ROWS
#define KQ_UNPACK_ROWS 24 /* from this many activation rows on, weight rows are unpacked first (kq_tile) */
#endif
/* The int8 activations' row stride: 64 bytes more than K. With K a multiple of 1024 (model widths
   often are), rows a 1 x 8 tile reads at one offset would otherwise fall in one set of the L1
   cache (8 ways; all 8 rows where K is a multiple of 4096), along with the weights: 1.2-1.3x the
   time at 8 rows, K = 4096. */
#ifndef KQ_X_STRIDE
#define KQ_X_STRIDE(K) ((K) + 64)
#endif
#ifndef KQ_PANEL
#define KQ_PANEL 8 /* weight rows unpacked together (kq_panel_unpacked), a multiple of 4 */
#endif
#ifndef KQ_CHUNK
#define KQ_CHUNK 4 /* super-blocks of a panel unpacked at a time (kq_panel_unpacked) */
#endif
#ifndef KQ_ROWS
#define KQ_ROWS 8 /* activation rows at a time: a super-block decoded once for up to 8 rows */
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

/* Per activation row, as llama.cpp's Q8_K: x [K] rounded to int8 in blocks of 256 (a super-block;
   xd: max |x| over it / 127), bs16 [K / 16]: the sums of the int8 values over each 16, what Q6_K's
   offset of 32 multiplies, and xb [K / 32]: the sums over each 32 times xd, what the Q4_K / Q5_K
   mins (times dmin) multiply. */
static void kq_activations(const float *x, int K, int8_t *xq, float *xd, int16_t *bs16, float *xb) {
    for (int sb = 0; sb < K / QK_K; sb++) {
        const float *b = x + sb * QK_K;
        int8_t *q = xq + sb * QK_K;
        float amax = 0.f;
        for (int i = 0; i < QK_K; i++) amax = fmaxf(amax, fabsf(b[i]));
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        xd[sb] = amax / 127.f;
        for (int i = 0; i < QK_K; i++) q[i] = (int8_t)lrintf(b[i] * inv);
        for (int g = 0; g < QK_K / 16; g++) {
            int sum = 0;
            for (int i = 0; i < 16; i++) sum += q[16 * g + i];
            bs16[sb * (QK_K / 16) + g] = (int16_t)sum;
        }
        for (int j = 0; j < QK_K / QK; j++)
            xb[sb * (QK_K / QK) + j] = xd[sb] * (float)(bs16[sb * (QK_K / 16) + 2 * j] + bs16[sb * (QK_K / 16) + 2 * j + 1]);
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
        /* bits 2t, 2t + 1 of each high byte moved to bits 4-5 (one shift fewer than shifting down,
           masking and shifting up) */
        const __m256i hb = _mm256_loadu_si256((const __m256i *)qh), bits45 = _mm256_set1_epi8(0x30);
        u[0] = _mm256_or_si256(_mm256_and_si256(a, low4), _mm256_and_si256(_mm256_slli_epi16(hb, 4), bits45));
        u[1] = _mm256_or_si256(_mm256_and_si256(c, low4), _mm256_and_si256(_mm256_slli_epi16(hb, 2), bits45));
        u[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), low4), _mm256_and_si256(hb, bits45));
        u[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), low4),
                               _mm256_and_si256(_mm256_srli_epi16(hb, 2), bits45));
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

/* Block j's scale vector from kq_rows' `scales`: 16 int16, all the block's scale (Q4_K / Q5_K), or
   lanes 0-7 the scale of its values 0-15 and 8-15 that of 16-31 (Q6_K; maddubs' lanes 0-7 are
   values 0-15). */
static inline __attribute__((always_inline)) __m256i kq_scale(int type, const __m256i scales[2], int j) {
    if (type != KQ_Q6_K) return _mm256_permutevar8x32_epi32(scales[0], _mm256_set1_epi32(j));
    /* scale 2j: element (2j % 4) + 4 (j >= 4) of scales[(j / 2) % 2]; 2j + 1 the next */
    const int e = 2 * j % 4 + 4 * (j >= 4);
    return _mm256_permutevar8x32_epi32(scales[j / 2 % 2], _mm256_setr_epi32(e, e, e, e, e + 1, e + 1, e + 1, e + 1));
}

/* Super-block b's scales as kq_rows and kq_tile take them: the blocks' scales as int16, each twice
   in a 32-bit lane, so that one permute gives block j its scale vector (kq_scale): Q4_K / Q5_K
   scales[0] lane j the scale of block j; Q6_K the 16 scales (one per 16 values) in scales[0]
   (lanes 0-3: 0-3, 4-7: 8-11) and scales[1] (4-7, 12-15). What the activations' sums multiply:
   Q6_K `offsets`, its 16 scales as int16 (times the sums per 16, and 32); Q4_K / Q5_K `mins`, lane
   j dmin times block j's min (times kq_activations' xb; exact: a 6-bit integer times an fp16).
   d the super-block's float scale. */
static inline __attribute__((always_inline)) void kq_scales(int type, const uint8_t *b, __m256i scales[2],
                                                            __m256i *offsets, __m256 *mins, float *d) {
    if (type == KQ_Q6_K) {
        uint16_t h;
        memcpy(&h, b + 208, sizeof h);
        *d = f16_to_f32(h);
        *offsets = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192)));
        *mins = _mm256_setzero_ps();
        scales[0] = _mm256_unpacklo_epi16(*offsets, *offsets);
        scales[1] = _mm256_unpackhi_epi16(*offsets, *offsets);
        return;
    }
    uint16_t h[2];
    uint8_t sm[16];
    memcpy(h, b, sizeof h);
    *d = f16_to_f32(h[0]);
    kq_scale_bytes(b + 4, sm);
    const __m128i both = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)sm));
    scales[0] = _mm256_setr_m128i(_mm_unpacklo_epi16(both, both), _mm_unpackhi_epi16(both, both));
    scales[1] = _mm256_setzero_si256();
    *offsets = _mm256_setzero_si256();
    *mins = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sm + 8)))),
                          _mm256_set1_ps(f16_to_f32(h[1])));
}

/* v, in a register, as it is at this point. Two things gcc does otherwise, each of which made these
   kernels 1.1-1.3x slower: it takes the integer sums of a super-block apart (integer addition
   being associative), computes all of its products first and spills them to the stack; and it
   reads a loaded vector again from memory at each use (kq_tile: 21 loads a step where 10 do). */
#define KQ_IN_REGISTER(v) __asm__("" : "+v"(v))

/* The two ends of a super-block for one (activation row, weight row) pair, shared by kq_rows and
   kq_tile so that they give a row the same bits. Start: the int32 sum begins at Q6_K's offset
   term (-32 times its scales against the activations' sums per 16, bs), or at zero with the Q4_K /
   Q5_K mins taken off the accumulator (kq_scales' mins against xb's 8 sums, sums). End: the sum
   times d and the activations' scale dx into the accumulator. */
static inline __attribute__((always_inline)) __m256i kq_start(int type, __m256i offsets, __m256 mins, __m256i bs,
                                                              __m256 sums, __m256 *acc) {
    if (type == KQ_Q6_K)
        return _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(offsets, bs), 5));
    *acc = _mm256_fnmadd_ps(mins, sums, *acc);
    return _mm256_setzero_si256();
}

static inline __attribute__((always_inline)) __m256 kq_end(__m256i sum, float d, float dx, __m256 acc) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(d * dx), acc);
}

/* nr weight rows (row r's super-blocks at w + r * row_bytes) against mr activation rows (4 x 1,
   2 x 2, or 1 x up to 8): out[m][r], the arithmetic of the file's head comment. A super-block is
   decoded once for the mr rows, in registers. Every (activation row, weight row) pair gets the
   same operations in the same order whatever nr and mr are, so a row's result does not depend on
   the batch. */
static inline __attribute__((always_inline)) void kq_rows(int type, const uint8_t *w, int64_t row_bytes,
                                                          const int8_t *xq, const float *xd, const int16_t *bs16,
                                                          const float *xb, int K, int nr, int mr, float out[8][4]) {
    const int nsb = K / QK_K;
    __m256 acc[8][4];
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < nr; r++) acc[m][r] = _mm256_setzero_ps();
    for (int sb = 0; sb < nsb; sb++) {
        prefetch_ahead(w, (int64_t)sb * KQ_BYTES[type] * nr, KQ_BYTES[type] * nr);
        for (int r = 0; r < nr; r++) {
            const uint8_t *b = w + r * row_bytes + (int64_t)sb * KQ_BYTES[type];
            __m256i scales[2], offsets;
            __m256 mins;
            float d;
            kq_scales(type, b, scales, &offsets, &mins, &d);
            __m256i sum[8]; /* per activation row: int32 lanes of this super-block's dot product */
            for (int m = 0; m < mr; m++)
                sum[m] = kq_start(type, offsets, mins,
                                  _mm256_loadu_si256((const __m256i *)(bs16 + ((int64_t)m * nsb + sb) * (QK_K / 16))),
                                  _mm256_loadu_ps(xb + ((int64_t)m * nsb + sb) * (QK_K / QK)), &acc[m][r]);
            for (int p = 0, j0 = 0; j0 < 8; p++) {
                __m256i u[4];
                const int n = kq_unsigned(type, b, p, u);
                for (int t = 0; t < n; t++) {
                    const int j = j0 + t;
                    const __m256i sv = kq_scale(type, scales, j);
                    for (int m = 0; m < mr; m++) {
                        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (int64_t)m * KQ_X_STRIDE(K) + sb * QK_K + j * QK));
                        /* u <= 63, |x| <= 127: a pair's sum fits int16 */
                        sum[m] = _mm256_add_epi32(sum[m], _mm256_madd_epi16(_mm256_maddubs_epi16(u[t], xv), sv));
                        KQ_IN_REGISTER(sum[m]);
                    }
                }
                j0 += n;
            }
            for (int m = 0; m < mr; m++) acc[m][r] = kq_end(sum[m], d, xd[(int64_t)m * nsb + sb], acc[m][r]);
        }
    }
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < nr; r++) out[m][r] = hsum(acc[m][r]);
}

/* One super-block of a weight row decoded once for many activation rows (kq_tile): its unsigned
   values, each block's scale vector (kq_scale), kq_scales' offsets and mins, and d. 608 bytes where
   the file has 144-210: only a few are unpacked at a time (kq_panel_unpacked), into a buffer that
   stays in the L1 cache. */
typedef struct {
    __m256i u[8], scale[8], offsets;
    __m256 mins;
    float d;
} kq_unpacked;

static inline __attribute__((always_inline)) void kq_unpack(int type, const uint8_t *b, kq_unpacked *out) {
    __m256i scales[2];
    kq_scales(type, b, scales, &out->offsets, &out->mins, &out->d);
    for (int p = 0, j0 = 0; j0 < 8; p++) {
        const int n = kq_unsigned(type, b, p, out->u + j0);
        for (int t = 0; t < n; t++) out->scale[j0 + t] = kq_scale(type, scales, j0 + t);
        j0 += n;
    }
}

/* kq_rows on unpacked super-blocks sb0 .. sb1 - 1 (row r's super-block sb at w[r * KQ_CHUNK + sb -
   sb0]), nr <= 4 weight rows against mr <= 2 activation rows, into the accumulators acc[m][r]: each
   activation block is loaded once for 4 weight rows where kq_rows loads it once for each, and
   nothing is decoded. The same integer sums and the same float operations in the same order as
   kq_rows, so either gives a row the same bits. */
static inline __attribute__((always_inline)) void kq_tile(int type, const kq_unpacked *w, const int8_t *xq,
                                                          int64_t x_stride, const float *xd, const int16_t *bs16,
                                                          const float *xb, int nsb, int sb0, int sb1, int nr, int mr,
                                                          __m256 acc[2][4]) {
    for (int sb = sb0; sb < sb1; sb++) {
        __m256i sum[2][4];
        for (int m = 0; m < mr; m++) {
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(bs16 + ((int64_t)m * nsb + sb) * (QK_K / 16)));
            const __m256 sums = _mm256_loadu_ps(xb + ((int64_t)m * nsb + sb) * (QK_K / QK));
            for (int r = 0; r < nr; r++) {
                const kq_unpacked *b = w + r * KQ_CHUNK + sb - sb0;
                sum[m][r] = kq_start(type, b->offsets, b->mins, bs, sums, &acc[m][r]);
            }
        }
        /* unrolled (gcc does not by itself): 1.1-1.2x */
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            __m256i xv[2];
            for (int m = 0; m < mr; m++) {
                xv[m] = _mm256_loadu_si256((const __m256i *)(xq + m * x_stride + (sb - sb0) * QK_K + j * QK));
                KQ_IN_REGISTER(xv[m]);
            }
            for (int r = 0; r < nr; r++) {
                const kq_unpacked *b = w + r * KQ_CHUNK + sb - sb0;
                __m256i u = b->u[j], sv = b->scale[j];
                KQ_IN_REGISTER(u);
                KQ_IN_REGISTER(sv);
                for (int m = 0; m < mr; m++) {
                    sum[m][r] = _mm256_add_epi32(sum[m][r], _mm256_madd_epi16(_mm256_maddubs_epi16(u, xv[m]), sv));
                    KQ_IN_REGISTER(sum[m][r]);
                }
            }
        }
        for (int m = 0; m < mr; m++)
            for (int r = 0; r < nr; r++)
                acc[m][r] = kq_end(sum[m][r], w[r * KQ_CHUNK + sb - sb0].d, xd[(int64_t)m * nsb + sb], acc[m][r]);
    }
}

/* Weight rows KQ_PANEL p .. KQ_PANEL (p + 1) - 1 against all M activation rows, KQ_CHUNK
   super-blocks at a time: each chunk of the panel's rows is unpacked into buf (KQ_PANEL x KQ_CHUNK
   super-blocks, 18 KiB: it stays in the L1 cache while every activation row passes over it), then
   each pair of activation rows goes through the panel 4 weight rows at a time (the pair's
   activations come from L2 once and from L1 after), the accumulators waiting in acc
   ([KQ_PANEL / 4][M / 2 rounded up][2][4]) between chunks. xc: the int8 activations chunk by
   chunk (chunk c at xc + M * c * KQ_CHUNK * 256, its rows contiguous), so that a pass over all
   rows reads memory in order. */
static inline __attribute__((always_inline)) void kq_panel_unpacked(int type, int p, const int8_t *xc,
                                                                    const float *xd, const int16_t *bs16,
                                                                    const float *xb, const uint8_t *w,
                                                                    kq_unpacked *buf,
                                                                    __m256 (*acc)[2][4], float *y, int M, int N,
                                                                    int K) {
    const int nsb = K / QK_K, n0 = KQ_PANEL * p, rows = N - n0 < KQ_PANEL ? N - n0 : KQ_PANEL;
    const int pairs = (M + 1) / 2;
    const int64_t row_bytes = (int64_t)nsb * KQ_BYTES[type];
    for (int i = 0; i < (rows + 3) / 4 * pairs; i++)
        for (int m = 0; m < 2; m++)
            for (int r = 0; r < 4; r++) acc[i][m][r] = _mm256_setzero_ps();
    for (int sb0 = 0; sb0 < nsb; sb0 += KQ_CHUNK) {
        const int sb1 = nsb - sb0 < KQ_CHUNK ? nsb : sb0 + KQ_CHUNK;
        const int64_t x_stride = (int64_t)(sb1 - sb0) * QK_K;
        for (int r = 0; r < rows; r++)
            for (int sb = sb0; sb < sb1; sb++)
                kq_unpack(type, w + (n0 + r) * row_bytes + (int64_t)sb * KQ_BYTES[type], buf + r * KQ_CHUNK + sb - sb0);
        for (int m0 = 0; m0 < M; m0 += 2) {
            const int mr = M - m0 < 2 ? M - m0 : 2;
            const int8_t *xm = xc + (int64_t)M * sb0 * QK_K + m0 * x_stride;
            const float *xdm = xd + (int64_t)m0 * nsb;
            const int16_t *bsm = bs16 + (int64_t)m0 * nsb * (QK_K / 16);
            const float *xbm = xb + (int64_t)m0 * nsb * (QK_K / QK);
            for (int r0 = 0; r0 < rows; r0 += 4) {
                const int nr = rows - r0 < 4 ? rows - r0 : 4;
                const kq_unpacked *wr = buf + r0 * KQ_CHUNK;
                __m256(*a)[4] = acc[r0 / 4 * pairs + m0 / 2];
                if (nr == 4 && mr == 2) kq_tile(type, wr, xm, x_stride, xdm, bsm, xbm, nsb, sb0, sb1, 4, 2, a);
                else if (nr == 4) kq_tile(type, wr, xm, x_stride, xdm, bsm, xbm, nsb, sb0, sb1, 4, 1, a);
                else kq_tile(type, wr, xm, x_stride, xdm, bsm, xbm, nsb, sb0, sb1, nr, mr, a);
            }
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < rows; r++) y[(int64_t)m * N + n0 + r] = hsum(acc[r / 4 * pairs + m / 2][m % 2][r % 4]);
}
#else
/* kq_rows in plain C: the same integer sums per super-block. */
static void kq_rows(int type, const uint8_t *w, int64_t row_bytes, const int8_t *xq, const float *xd,
                    const int16_t *bs16, const float *xb, int K, int nr, int mr, float out[8][4]) {
    (void)xb; /* the mins in integers here */
    const int nsb = K / QK_K;
    kq_block blk;
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < nr; r++) out[m][r] = 0.f;
    for (int r = 0; r < nr; r++)
        for (int sb = 0; sb < nsb; sb++) {
            const uint8_t *b = w + r * row_bytes + (int64_t)sb * KQ_BYTES[type];
            kq_decode(type, b, &blk); /* the unsigned values */
            int scale[16], offset[16]; /* per 16 values */
            float d, dmin = 0.f;
            uint16_t h[2];
            memcpy(h, type == KQ_Q6_K ? b + 208 : b, type == KQ_Q6_K ? 2 : 4);
            d = f16_to_f32(h[0]);
            if (type == KQ_Q6_K) {
                for (int g = 0; g < 16; g++) scale[g] = offset[g] = ((const int8_t *)(b + 192))[g];
            } else {
                dmin = f16_to_f32(h[1]);
                for (int j = 0; j < 8; j++) {
                    int sc, mn;
                    scale_min_k4(j, b + 4, &sc, &mn);
                    scale[2 * j] = scale[2 * j + 1] = sc;
                    offset[2 * j] = offset[2 * j + 1] = mn;
                }
            }
            for (int m = 0; m < mr; m++) {
                const int8_t *a = xq + (int64_t)m * KQ_X_STRIDE(K) + sb * QK_K;
                const int16_t *bs = bs16 + ((int64_t)m * nsb + sb) * (QK_K / 16);
                int32_t sum = 0, corr = 0;
                for (int g = 0; g < 16; g++) {
                    int32_t dot = 0;
                    for (int i = 0; i < 16; i++) dot += (int32_t)blk.u[g / 2][16 * (g % 2) + i] * a[16 * g + i];
                    sum += scale[g] * dot;
                    corr += offset[g] * bs[g];
                }
                const float dx = xd[(int64_t)m * nsb + sb];
                if (type == KQ_Q6_K) out[m][r] += d * dx * (float)(sum - 32 * corr);
                else out[m][r] += d * dx * (float)sum - dmin * dx * (float)corr;
            }
        }
}
#endif

/* Weight rows 4 n4 .. 4 n4 + 3 against all M activation rows: tiles of 4 x 1, 2 x 2, 1 x 4 or 1 x 8
   (weight x activation rows). */
static inline __attribute__((always_inline)) void kq_panel(int type, int n4, const int8_t *xq, const float *xd,
                                                           const int16_t *bs16, const float *xb, const uint8_t *w,
                                                           float *y, int M, int N, int K) {
    const int nsb = K / QK_K;
    const int64_t row_bytes = (int64_t)nsb * KQ_BYTES[type];
    for (int m0 = 0, mr; m0 < M; m0 += mr) {
        /* 8, 4, 2 or 1 rows at a time (M = 7: 4 + 2 + 1): shapes the compiler keeps in registers,
           where 1 x 3 .. 1 x 7 took twice the time of 1 x 8 */
        for (mr = KQ_ROWS; mr > M - m0;) mr /= 2;
        const int step = KQ_STEP(mr);
        const int8_t *xqm = xq + (int64_t)m0 * KQ_X_STRIDE(K);
        const float *xdm = xd + (int64_t)m0 * nsb;
        const int16_t *bsm = bs16 + (int64_t)m0 * nsb * (QK_K / 16);
        const float *xbm = xb + (int64_t)m0 * nsb * (QK_K / QK);
        for (int n0 = 4 * n4; n0 < 4 * n4 + 4 && n0 < N; n0 += step) {
            const int nr = N - n0 < step ? N - n0 : step;
            const uint8_t *wn = w + n0 * row_bytes;
            float out[8][4];
            /* constant shapes: the accumulators stay in registers */
            if (nr == 4 && mr == 1) kq_rows(type, wn, row_bytes, xqm, xdm, bsm, xbm, K, 4, 1, out);
            else if (nr == 2 && mr == 2) kq_rows(type, wn, row_bytes, xqm, xdm, bsm, xbm, K, 2, 2, out);
            else if (nr == 1 && mr == 4) kq_rows(type, wn, row_bytes, xqm, xdm, bsm, xbm, K, 1, 4, out);
            else if (nr == 1 && mr == 8) kq_rows(type, wn, row_bytes, xqm, xdm, bsm, xbm, K, 1, 8, out);
            else kq_rows(type, wn, row_bytes, xqm, xdm, bsm, xbm, K, nr, mr, out);
            for (int m = 0; m < mr; m++)
                for (int r = 0; r < nr; r++) y[(int64_t)(m0 + m) * N + n0 + r] = out[m][r];
        }
    }
}

/* y[m, n] = sum_k x[m, k] w[n, k], w as K-quant super-blocks of `type` ([N, K / 256] blocks, rows
   contiguous). K a multiple of 256. Returns 0, or -1 when out of memory. */
static int kq_linear(int type, const float *x, const uint8_t *w, float *y, int M, int N, int K) {
    const int nsb = K / QK_K;
    int8_t *xq = malloc((size_t)M * KQ_X_STRIDE(K));
    float *xd = malloc(sizeof(float) * (size_t)M * nsb);
    int16_t *bs16 = malloc(sizeof(int16_t) * (size_t)M * nsb * (QK_K / 16));
    float *xb = malloc(sizeof(float) * (size_t)M * nsb * (QK_K / QK));
    if (!xq || !xd || !bs16 || !xb) { free(xq); free(xd); free(bs16); free(xb); return -1; }
#pragma omp parallel for if (M > 8)
    for (int m = 0; m < M; m++)
        kq_activations(x + (int64_t)m * K, K, xq + (int64_t)m * KQ_X_STRIDE(K), xd + (int64_t)m * nsb,
                       bs16 + (int64_t)m * nsb * (QK_K / 16), xb + (int64_t)m * nsb * (QK_K / QK));
#ifdef QK_AVX2
    if (M >= KQ_UNPACK_ROWS) {
        int8_t *xc = malloc((size_t)M * K); /* xq chunk by chunk (kq_panel_unpacked) */
        int failed = !xc;
        for (int sb0 = 0; xc && sb0 < nsb; sb0 += KQ_CHUNK) {
            const int width = (nsb - sb0 < KQ_CHUNK ? nsb - sb0 : KQ_CHUNK) * QK_K;
            for (int m = 0; m < M; m++)
                memcpy(xc + (int64_t)M * sb0 * QK_K + (int64_t)m * width, xq + (int64_t)m * KQ_X_STRIDE(K) + sb0 * QK_K, width);
        }
#pragma omp parallel
        {
            kq_unpacked *buf = aligned_alloc(32, sizeof(kq_unpacked) * KQ_PANEL * KQ_CHUNK);
            __m256(*acc)[2][4] = aligned_alloc(32, sizeof(__m256[2][4]) * (KQ_PANEL / 4) * (size_t)((M + 1) / 2));
            if (!buf || !acc || !xc) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(static)
            for (int p = 0; p < (N + KQ_PANEL - 1) / KQ_PANEL; p++) {
                if (!buf || !acc || !xc) continue;
                switch (type) {
                case KQ_Q4_K: kq_panel_unpacked(KQ_Q4_K, p, xc, xd, bs16, xb, w, buf, acc, y, M, N, K); break;
                case KQ_Q5_K: kq_panel_unpacked(KQ_Q5_K, p, xc, xd, bs16, xb, w, buf, acc, y, M, N, K); break;
                default: kq_panel_unpacked(KQ_Q6_K, p, xc, xd, bs16, xb, w, buf, acc, y, M, N, K); break;
                }
            }
            free(buf);
            free(acc);
        }
        free(xc);
        free(xq);
        free(xd);
        free(bs16);
        free(xb);
        return failed ? -1 : 0;
    }
#endif
#pragma omp parallel for schedule(static)
    for (int n4 = 0; n4 < (N + 3) / 4; n4++)
        switch (type) { /* a constant type in each: the decoding specialised, its loops unrolled */
        case KQ_Q4_K: kq_panel(KQ_Q4_K, n4, xq, xd, bs16, xb, w, y, M, N, K); break;
        case KQ_Q5_K: kq_panel(KQ_Q5_K, n4, xq, xd, bs16, xb, w, y, M, N, K); break;
        default: kq_panel(KQ_Q6_K, n4, xq, xd, bs16, xb, w, y, M, N, K); break;
        }
    free(xq);
    free(xd);
    free(bs16);
    free(xb);
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
