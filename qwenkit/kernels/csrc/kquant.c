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
   in registers, for up to 8 of them (kq_rows), every (activation row, weight row) pair getting
   the same operations in the same order whatever the number of rows, so a row's result does not
   depend on the batch. With AVX-512 VNNI that path multiplies a vector lane a block (one vpdpbusd
   4 values of 8 blocks, each block's sum scaled once) instead of maddubs and a scale per block,
   the same integers. From there on (prefill) panels of 8 weight rows are unpacked once, a
   vector lane a row, and every activation row passes over them (kq_lanes_tile): the same scaled
   integer dot products, the mins and the float sums rounded otherwise; under qk_row_invariant
   (--deterministic) kq_rows takes every row count.
   kq_dequantize gives the exact float weights where no kernel runs. Plain C takes the same
   arithmetic without AVX2. */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

#define QK_K 256
#ifndef KQ_STEP /* weight rows at a time, for mr activation rows */
#ifdef QK_AVX512
#define KQ_STEP(mr) ((mr) <= 4 ? 4 : 2) /* two rows a 512-bit vector (kq_rows) */
#else
#define KQ_STEP(mr) ((mr) == 1 ? 4 : (mr) == 2 ? 2 : 1)
#endif
#endif
#ifndef KQ_UNPACK_ROWS /* from this many activation rows on, panels of weight rows are unpacked first */
#ifdef QK_AVX512
#define KQ_UNPACK_ROWS 64 /* the decode path's vpdpbusd outruns the panels' vpmaddubsw up to here (~32-128) */
#else
#define KQ_UNPACK_ROWS 16
#endif
#endif
/* The int8 activations' row stride: 64 bytes more than K. With K a multiple of 1024 (model widths
   often are), rows a 1 x 8 tile reads at one offset would otherwise fall in one set of the L1
   cache (8 ways; all 8 rows where K is a multiple of 4096), along with the weights: 1.2-1.3x the
   time at 8 rows, K = 4096. */
#ifndef KQ_X_STRIDE
#define KQ_X_STRIDE(K) ((K) + 64)
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

/* The 8 scales and 8 mins of a Q4_K / Q5_K super-block, unpacked from their 12 bytes (the same
   bits as scale_min_k4) in a vector register: bytes 0-7 the scales, 8-15 the mins. Built there,
   they go straight to the kernels' conversions (built as four dwords in memory, an 8-byte load of
   them waited for the stores to retire). The 16 bytes read from `packed` are within the
   super-block (its values follow the 12 scale bytes). */
static inline __m128i kq_scale_vector(const uint8_t *packed) {
    const __m128i v = _mm_loadu_si128((const __m128i *)packed);  /* dwords a, b, c (and 4 bytes after) */
    const __m128i p = _mm_shuffle_epi32(v, _MM_SHUFFLE(1, 1, 0, 0)); /* a a b b */
    const __m128i q = _mm_srlv_epi32(_mm_shuffle_epi32(v, _MM_SHUFFLE(2, 2, 2, 2)), _mm_setr_epi32(0, 0, 0, 4));
    /* lanes 0, 2: a, b & low6 (scales 0-3, mins 0-3); lanes 1, 3: c's low / high nibbles with
       bits 6-7 of a / b as bits 4-5 (scales 4-7, mins 4-7) */
    const __m128i low6 = _mm_and_si128(p, _mm_set1_epi8(0x3f));
    const __m128i high = _mm_or_si128(_mm_and_si128(q, _mm_set1_epi8(0x0f)),
                                      _mm_and_si128(_mm_srli_epi32(p, 2), _mm_set1_epi8(0x30)));
    return _mm_blend_epi32(low6, high, 0xa);
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

/* Super-block b's scales as kq_rows takes them: the blocks' scales as int16, each twice
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
    memcpy(h, b, sizeof h);
    *d = f16_to_f32(h[0]);
    const __m128i sm = kq_scale_vector(b + 4);
    const __m128i both = _mm_cvtepu8_epi16(sm);
    scales[0] = _mm256_setr_m128i(_mm_unpacklo_epi16(both, both), _mm_unpackhi_epi16(both, both));
    scales[1] = _mm256_setzero_si256();
    *offsets = _mm256_setzero_si256();
    *mins = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8))),
                          _mm256_set1_ps(f16_to_f32(h[1])));
}

/* The two ends of a super-block for one (activation row, weight row) pair in kq_rows. Start: the
   int32 sum begins at Q6_K's offset term (-32 times its scales against the activations' sums per
   16, bs), or at zero with the Q4_K / Q5_K mins taken off the accumulator (kq_scales' mins against
   xb's 8 sums, sums). End: the sum times d and the activations' scale dx into the accumulator. */
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

#ifndef QK_AVX512
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
                        sum[m] = madd_acc_epi16(sum[m], _mm256_maddubs_epi16(u[t], xv), sv);
                        IN_REGISTER(sum[m]);
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
#else
/* AVX-512 VNNI: the decode path a vector lane a block. The AVX2 kq_rows gives each block of 32
   values a vpmaddubsw and a multiply-add by its scale per activation row; here a super-block of
   two weight rows is turned (kq_transpose_x2) so that lane j of vector g holds values 4g .. 4g + 3
   of block j, row a in the low half, row b in the high one, and the activations are laid out
   alike once per call (kq_activation_lanes). One vpdpbusd then takes 4 values of all 8 blocks of
   both rows, eight of them a super-block, and lane j ends with block j's integer dot product,
   which its scale multiplies once (vpmulld; Q6_K: per half block, two). The mins and Q6_K's
   offset of 32 are lane a block already (kq_start's terms). */

/* Each 256-bit half of v[0..7] transposed as 8 x 8 dwords (transpose_8x8_epi32 on both halves
   at once): v[j] block j's 32 bytes -> v[g] dword g of every block, lane j block j's. */
static inline __attribute__((always_inline)) void kq_transpose_x2(__m512i v[8]) {
    __m512i t[8], u[8];
    for (int h = 0; h < 2; h++) {
        t[4 * h] = _mm512_unpacklo_epi32(v[4 * h], v[4 * h + 1]);
        t[4 * h + 1] = _mm512_unpackhi_epi32(v[4 * h], v[4 * h + 1]);
        t[4 * h + 2] = _mm512_unpacklo_epi32(v[4 * h + 2], v[4 * h + 3]);
        t[4 * h + 3] = _mm512_unpackhi_epi32(v[4 * h + 2], v[4 * h + 3]);
        u[4 * h] = _mm512_unpacklo_epi64(t[4 * h], t[4 * h + 2]);     /* dwords 0 | 4 of blocks 4h .. 4h+3 */
        u[4 * h + 1] = _mm512_unpackhi_epi64(t[4 * h], t[4 * h + 2]); /* 1 | 5 */
        u[4 * h + 2] = _mm512_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]); /* 2 | 6 */
        u[4 * h + 3] = _mm512_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]); /* 3 | 7 */
    }
    /* qwords: the low 128 bits of each half from u[g] then u[4 + g] (dwords g), the high ones (g + 4) */
    const __m512i low = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
    const __m512i high = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    for (int g = 0; g < 4; g++) {
        v[g] = _mm512_permutex2var_epi64(u[g], low, u[4 + g]);
        v[g + 4] = _mm512_permutex2var_epi64(u[g], high, u[4 + g]);
    }
}

/* One activation row's int8 values (K of them) turned in place a lane a block, for kq_rows:
   super-block sb's vector g (32 bytes at 256 sb + 32 g) holds values 4g .. 4g + 3 of each of its
   8 blocks, block j in lane j. kq_rows broadcasts it to both halves of a 512-bit vector as it loads it
   (stored twice, 8 rows of a 4096-wide matrix outgrew the L1 cache: 1.3-1.6x the time). */
static void kq_activation_lanes(int8_t *xq, int K) {
    for (int sb = 0; sb < K / QK_K; sb++) {
        __m256i v[8];
        for (int j = 0; j < 8; j++) v[j] = _mm256_loadu_si256((const __m256i *)(xq + sb * QK_K + QK * j));
        transpose_8x8_epi32(v);
        for (int g = 0; g < 8; g++) _mm256_storeu_si256((__m256i *)(xq + QK_K * sb + 32 * g), v[g]);
    }
}

/* What a super-block of one weight row contributes besides its values, a lane a block: sc its
   scales (Q6_K: of the first 16 values of each block, sc_hi of the second), offsets Q6_K's 16
   scales as int16 (against the activations' sums per 16), mins (Q4_K / Q5_K) dmin m. */
static inline __attribute__((always_inline)) float kq_lane_scales(int type, const uint8_t *b, __m256i *sc,
                                                                  __m256i *sc_hi, __m256i *offsets, __m256 *mins) {
    if (type == KQ_Q6_K) {
        uint16_t h;
        memcpy(&h, b + 208, sizeof h);
        *offsets = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192)));
        *sc = _mm256_srai_epi32(_mm256_slli_epi32(*offsets, 16), 16); /* scale 2j in lane j */
        *sc_hi = _mm256_srai_epi32(*offsets, 16);                     /* scale 2j + 1 */
        *mins = _mm256_setzero_ps();
        return f16_to_f32(h);
    }
    uint16_t h[2];
    memcpy(h, b, sizeof h);
    const __m128i sm = kq_scale_vector(b + 4);
    *sc = _mm256_cvtepu8_epi32(sm);
    *sc_hi = *offsets = _mm256_setzero_si256();
    *mins = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8))),
                          _mm256_set1_ps(f16_to_f32(h[1])));
    return f16_to_f32(h[0]);
}

static inline __m512i join_epi32(__m256i a, __m256i b) { return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1); }
static inline __m512 join_ps(__m256 a, __m256 b) {
    return _mm512_castsi512_ps(join_epi32(_mm256_castps_si256(a), _mm256_castps_si256(b)));
}

/* nr weight rows (4 x 1, 4 x 2, 4 x 4 or 2 x 8 against mr activation rows; nr odd at a matrix's
   end: its last row computed twice, once dropped) -> out[m][r]. xt: kq_activation_lanes' rows,
   KQ_X_STRIDE(K) apart. Each (activation row, weight row) pair gets the same operations in the
   same order in either half whatever nr and mr are, so a row's result does not depend on the
   batch. */
static inline __attribute__((always_inline)) void kq_rows(int type, const uint8_t *w, int64_t row_bytes,
                                                          const int8_t *xt, const float *xd, const int16_t *bs16,
                                                          const float *xb, int K, int nr, int mr, float out[8][4]) {
    const int nsb = K / QK_K, pairs = (nr + 1) / 2;
    __m512 acc[8][2];
    for (int m = 0; m < mr; m++)
        for (int p = 0; p < pairs; p++) acc[m][p] = _mm512_setzero_ps();
    for (int sb = 0; sb < nsb; sb++) {
        prefetch_ahead(w, (int64_t)sb * KQ_BYTES[type] * nr, KQ_BYTES[type] * nr);
        for (int p = 0; p < pairs; p++) {
            const uint8_t *b[2] = {w + 2 * p * row_bytes + (int64_t)sb * KQ_BYTES[type],
                                   w + (2 * p + 1 < nr ? 2 * p + 1 : 2 * p) * row_bytes + (int64_t)sb * KQ_BYTES[type]};
            __m256i u[2][8], sc[2], sc_hi[2], offsets[2];
            __m256 mins[2];
            float d[2];
            for (int h = 0; h < 2; h++) {
                for (int q = 0, j0 = 0; j0 < 8; q++) j0 += kq_unsigned(type, b[h], q, u[h] + j0);
                d[h] = kq_lane_scales(type, b[h], &sc[h], &sc_hi[h], &offsets[h], &mins[h]);
            }
            __m512i v[8];
            for (int j = 0; j < 8; j++) v[j] = join_epi32(u[0][j], u[1][j]);
            kq_transpose_x2(v);
            const __m512i scale = join_epi32(sc[0], sc[1]), scale_hi = join_epi32(sc_hi[0], sc_hi[1]);
            const __m512i offset = join_epi32(offsets[0], offsets[1]);
            const __m512 min = join_ps(mins[0], mins[1]), dd = pair_ps(d[0], d[1]);
            for (int m = 0; m < mr; m++) {
                const __m256i *x = (const __m256i *)(xt + (int64_t)m * KQ_X_STRIDE(K) + QK_K * sb);
                __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
                for (int g = 0; g < 4; g++) {
                    lo = _mm512_dpbusd_epi32(lo, v[g], _mm512_broadcast_i64x4(_mm256_loadu_si256(x + g)));
                    hi = _mm512_dpbusd_epi32(hi, v[g + 4], _mm512_broadcast_i64x4(_mm256_loadu_si256(x + g + 4)));
                }
                const int64_t i = (int64_t)m * nsb + sb;
                __m512i sum;
                if (type == KQ_Q6_K) {
                    const __m512i bs = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(bs16 + 16 * i)));
                    sum = _mm512_add_epi32(_mm512_mullo_epi32(lo, scale), _mm512_mullo_epi32(hi, scale_hi));
                    sum = _mm512_sub_epi32(sum, _mm512_slli_epi32(_mm512_madd_epi16(offset, bs), 5));
                } else {
                    sum = _mm512_mullo_epi32(_mm512_add_epi32(lo, hi), scale);
                    const __m512 sums = _mm512_castsi512_ps(
                        _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xb + 8 * i))));
                    acc[m][p] = _mm512_fnmadd_ps(min, sums, acc[m][p]);
                }
                const __m512 scale_dx = _mm512_mul_ps(dd, _mm512_set1_ps(xd[i]));
                acc[m][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale_dx, acc[m][p]);
                IN_REGISTER_512(acc[m][p]);
            }
        }
    }
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < nr; r++) {
            const __m512i a = _mm512_castps_si512(acc[m][r / 2]);
            out[m][r] = hsum(_mm256_castsi256_ps(r % 2 ? _mm512_extracti64x4_epi64(a, 1) : _mm512_castsi512_si256(a)));
        }
}

/* kq_rows' numbers for a call of one activation row, its int8 values as they are (not turned):
   turning a super-block of weights costs more shuffles than one row's products save (1.45x the
   time). Block j's products in their natural order (one vpdpbusd each), then a tree of vphaddd
   sums each block's lanes into lane j, the two 128-bit halves (values 0-15 and 16-31 of a block)
   kept apart as kq_rows' lo and hi: the same integers, then the same operations as either half of
   kq_rows, so a row's result is the same alone or in a batch. */
static inline __attribute__((always_inline)) void kq_rows_alone(int type, const uint8_t *w, int64_t row_bytes,
                                                                const int8_t *xq, const float *xd, const int16_t *bs16,
                                                                const float *xb, int K, int nr, float out[4]) {
    const int nsb = K / QK_K;
    __m256 acc[4];
    for (int r = 0; r < nr; r++) acc[r] = _mm256_setzero_ps();
    for (int sb = 0; sb < nsb; sb++) {
        prefetch_ahead(w, (int64_t)sb * KQ_BYTES[type] * nr, KQ_BYTES[type] * nr);
        const __m256i *x = (const __m256i *)(xq + QK_K * sb);
        const __m256 dx = _mm256_set1_ps(xd[sb]);
        for (int r = 0; r < nr; r++) {
            const uint8_t *b = w + r * row_bytes + (int64_t)sb * KQ_BYTES[type];
            __m256i u[8], scale, scale_hi, offsets;
            __m256 mins;
            for (int q = 0, j0 = 0; j0 < 8; q++) j0 += kq_unsigned(type, b, q, u + j0);
            const float d = kq_lane_scales(type, b, &scale, &scale_hi, &offsets, &mins);
            for (int j = 0; j < 8; j++)
                u[j] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u[j], _mm256_loadu_si256(x + j));
            const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(u[0], u[1]), _mm256_hadd_epi32(u[2], u[3]));
            const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(u[4], u[5]), _mm256_hadd_epi32(u[6], u[7]));
            const __m256i lo = _mm256_permute2x128_si256(h0, h1, 0x20), hi = _mm256_permute2x128_si256(h0, h1, 0x31);
            __m256i sum;
            if (type == KQ_Q6_K) {
                const __m256i bs = _mm256_loadu_si256((const __m256i *)(bs16 + 16 * sb));
                sum = _mm256_add_epi32(_mm256_mullo_epi32(lo, scale), _mm256_mullo_epi32(hi, scale_hi));
                sum = _mm256_sub_epi32(sum, _mm256_slli_epi32(_mm256_madd_epi16(offsets, bs), 5));
            } else {
                sum = _mm256_mullo_epi32(_mm256_add_epi32(lo, hi), scale);
                acc[r] = _mm256_fnmadd_ps(mins, _mm256_loadu_ps(xb + 8 * sb), acc[r]);
            }
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(_mm256_set1_ps(d), dx), acc[r]);
        }
    }
    for (int r = 0; r < nr; r++) out[r] = hsum(acc[r]);
}
#endif

/* ---- From KQ_UNPACK_ROWS activation rows on (prefill): panels of 8 weight rows unpacked once per
   call so that a vector lane is a weight row, as Q5_0's prefill path does (quant.c): 4 bytes of an
   activation row broadcast to every lane give each row its own 4 products, one vpmaddubsw 32
   products for 8 rows. The pairs stay int16 for as long as they cannot overflow (Q4_K: a block of
   32 values, pairs <= 2 * 15 * 127; Q5_K: half a block, <= 2 * 31 * 127; Q6_K: 8 values, <= 2 * 63
   * 127), then one vpmaddwd multiplies them by the rows' scales (a lane pair a row) into int32. A
   super-block's mins (Q4_K / Q5_K) or offset of 32 (Q6_K) are integer dot products too, of the
   rows' mins or scales with the activations' sums per 32 or 16 values, so a super-block's sum is
   exact; then one conversion and one FMA per super-block for the 8 rows (two with the mins), and
   no horizontal sums. One super-block of a panel, unpacked: 2.8 KiB. */
typedef struct {
    __m256i v[64];      /* v[g]: the unsigned values at k = 4g .. 4g+3, bytes 4r .. 4r+3 those of row r */
    __m256i scale[16];  /* Q4_K / Q5_K scale[j] the scale of block j, Q6_K scale[g] that of values 16g..16g+15;
                           int16, lanes 2r and 2r + 1 row r's */
    __m256i offsets[8]; /* int16 pairs, lanes 2r, 2r + 1 row r's: Q4_K / Q5_K [i < 4] the mins of blocks
                           2i, 2i + 1; Q6_K [i] its scales 2i, 2i + 1 (the offset of 32 times each scale) */
    __m256 d, dmin;     /* the rows' super-block scales */
} kq_lanes;

#ifndef KQ_MT
#define KQ_MT 3 /* activation rows a tile (kq_lanes_tile) */
#endif

/* Super-block sb of weight rows w[0 .. nr) (nr <= 8; the lanes past nr zero) -> out. */
static inline __attribute__((always_inline)) void kq_unpack_lanes(int type, const uint8_t *w, int64_t row_bytes,
                                                                  int nr, int sb, kq_lanes *out) {
    __m256i u[8][8]; /* [row][block of 32] */
    int16_t *scale = (int16_t *)out->scale, *offsets = (int16_t *)out->offsets;
    float d[8], dmin[8];
    for (int r = 0; r < 8; r++) {
        if (r >= nr) {
            for (int j = 0; j < 8; j++) u[r][j] = _mm256_setzero_si256();
            for (int g = 0; g < 16; g++) scale[16 * g + 2 * r] = scale[16 * g + 2 * r + 1] = 0;
            for (int i = 0; i < 8; i++) offsets[16 * i + 2 * r] = offsets[16 * i + 2 * r + 1] = 0;
            d[r] = dmin[r] = 0.f;
            continue;
        }
        const uint8_t *b = w + r * row_bytes + (int64_t)sb * KQ_BYTES[type];
        for (int p = 0, j0 = 0; j0 < 8; p++) j0 += kq_unsigned(type, b, p, u[r] + j0);
        if (type == KQ_Q6_K) {
            const int8_t *sc = (const int8_t *)(b + 192);
            uint16_t h;
            memcpy(&h, b + 208, sizeof h);
            d[r] = f16_to_f32(h);
            dmin[r] = 0.f;
            for (int g = 0; g < 16; g++) scale[16 * g + 2 * r] = scale[16 * g + 2 * r + 1] = sc[g];
            for (int i = 0; i < 8; i++) {
                offsets[16 * i + 2 * r] = sc[2 * i];
                offsets[16 * i + 2 * r + 1] = sc[2 * i + 1];
            }
        } else {
            uint16_t h[2];
            uint8_t sm[16];
            memcpy(h, b, sizeof h);
            d[r] = f16_to_f32(h[0]);
            dmin[r] = f16_to_f32(h[1]);
            _mm_storeu_si128((__m128i *)sm, kq_scale_vector(b + 4));
            for (int j = 0; j < 8; j++) scale[16 * j + 2 * r] = scale[16 * j + 2 * r + 1] = sm[j];
            for (int i = 0; i < 4; i++) {
                offsets[16 * i + 2 * r] = sm[8 + 2 * i];
                offsets[16 * i + 2 * r + 1] = sm[8 + 2 * i + 1];
            }
        }
    }
    for (int j = 0; j < 8; j++) {
        __m256i t[8];
        for (int r = 0; r < 8; r++) t[r] = u[r][j];
        transpose_8x8_epi32(t);
        for (int g = 0; g < 8; g++) out->v[8 * j + g] = t[g];
    }
    out->d = _mm256_loadu_ps(d);
    out->dmin = _mm256_loadu_ps(dmin);
}

/* out[m][r] for the 8 rows of an unpacked panel (nsb super-blocks) and mr (<= 4) activation rows:
   xq rows x_stride apart, xd their scales per super-block, bs their int16 sums per 16 values
   (Q6_K; kq_activations' bs16) or per 32 (Q4_K / Q5_K), nsb * 16 or nsb * 8 a row. */
static inline __attribute__((always_inline)) void kq_lanes_tile(int type, const kq_lanes *w, const int8_t *xq,
                                                                int64_t x_stride, const float *xd, const int16_t *bs,
                                                                int nsb, int mr, float out[][8]) {
    const int run = type == KQ_Q6_K ? 2 : type == KQ_Q5_K ? 4 : 8; /* vectors summed in int16 */
    const int per_bs = type == KQ_Q6_K ? 16 : 8, pairs_bs = type == KQ_Q6_K ? 8 : 4;
    __m256 acc[4];
    for (int m = 0; m < mr; m++) acc[m] = _mm256_setzero_ps();
    for (int sb = 0; sb < nsb; sb++) {
        const kq_lanes *l = w + sb;
        __m256i sum[4], pairs[4];
        for (int m = 0; m < mr; m++) sum[m] = pairs[m] = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
#pragma GCC unroll 8
            for (int t = 0; t < 8; t++) {
                const int g = 8 * j + t;
                const __m256i v = l->v[g];
                for (int m = 0; m < mr; m++) {
                    const __m256i x = broadcast_4_bytes(xq + m * x_stride + sb * QK_K + 4 * g);
                    pairs[m] = _mm256_add_epi16(pairs[m], _mm256_maddubs_epi16(v, x));
                    if (type != KQ_Q6_K) IN_REGISTER(pairs[m]); /* Q4_K 1.2x; Q6_K (runs of 2) 1-5% slower */
                }
                if ((t + 1) % run == 0) {
                    const __m256i sv = l->scale[type == KQ_Q6_K ? 2 * j + t / 4 : j];
                    for (int m = 0; m < mr; m++) {
                        sum[m] = madd_acc_epi16(sum[m], pairs[m], sv);
                        pairs[m] = _mm256_setzero_si256();
                        IN_REGISTER(sum[m]);
                    }
                }
            }
        }
        for (int m = 0; m < mr; m++) {
            const int16_t *bsm = bs + ((int64_t)m * nsb + sb) * per_bs;
            __m256i o = _mm256_setzero_si256();
            for (int i = 0; i < pairs_bs; i++) {
                int32_t pair;
                memcpy(&pair, bsm + 2 * i, sizeof pair);
                o = madd_acc_epi16(o, l->offsets[i], _mm256_set1_epi32(pair));
            }
            const __m256 dx = broadcast_load(xd + (int64_t)m * nsb + sb);
            if (type == KQ_Q6_K) {
                const __m256i s = _mm256_sub_epi32(sum[m], _mm256_slli_epi32(o, 5));
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(l->d, dx), acc[m]);
            } else {
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[m]), _mm256_mul_ps(l->d, dx), acc[m]);
                acc[m] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(o), _mm256_mul_ps(l->dmin, dx), acc[m]);
            }
        }
    }
    for (int m = 0; m < mr; m++) _mm256_storeu_ps(out[m], acc[m]);
}

/* Weight rows 8p .. 8p + 7 against all M activation rows: the panel unpacked into buf (nsb x 2.8
   KiB; unpacking a few super-blocks at a time to keep them in the L1 cache measured no faster),
   then KQ_MT activation rows at a time over it. */
static inline __attribute__((always_inline)) void kq_panel_lanes(int type, int p, const int8_t *xq, const float *xd,
                                                                 const int16_t *bs, const uint8_t *w, kq_lanes *buf,
                                                                 float *y, int M, int N, int K) {
    const int nsb = K / QK_K, n0 = 8 * p, nr = N - n0 < 8 ? N - n0 : 8, per_bs = type == KQ_Q6_K ? 16 : 8;
    const int64_t row_bytes = (int64_t)nsb * KQ_BYTES[type], x_stride = KQ_X_STRIDE(K);
    for (int sb = 0; sb < nsb; sb++) kq_unpack_lanes(type, w + n0 * row_bytes, row_bytes, nr, sb, buf + sb);
    for (int m0 = 0; m0 < M; m0 += KQ_MT) {
        const int mr = M - m0 < KQ_MT ? M - m0 : KQ_MT;
        const int8_t *xm = xq + m0 * x_stride;
        const float *xdm = xd + (int64_t)m0 * nsb;
        const int16_t *bsm = bs + (int64_t)m0 * nsb * per_bs;
        float out[KQ_MT][8];
        if (mr == KQ_MT) kq_lanes_tile(type, buf, xm, x_stride, xdm, bsm, nsb, KQ_MT, out);
        else kq_lanes_tile(type, buf, xm, x_stride, xdm, bsm, nsb, mr, out);
        for (int m = 0; m < mr; m++) memcpy(y + (int64_t)(m0 + m) * N + n0, out[m], sizeof(float) * nr);
    }
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
   (weight x activation rows; AVX-512 4 x 1, 4 x 2, 4 x 4 or 2 x 8). */
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
#ifdef QK_AVX512
            if (M == 1) { /* the activations as they are (kq_linear) */
                if (nr == 4) kq_rows_alone(type, wn, row_bytes, xqm, xdm, bsm, xbm, K, 4, out[0]);
                else kq_rows_alone(type, wn, row_bytes, xqm, xdm, bsm, xbm, K, nr, out[0]);
                memcpy(y + n0, out[0], sizeof(float) * nr);
                continue;
            }
#endif
            /* constant shapes: the accumulators stay in registers */
#define KQ_SHAPE(n, m) else if (nr == (n) && mr == (m)) kq_rows(type, wn, row_bytes, xqm, xdm, bsm, xbm, K, n, m, out)
            if (0) {}
#ifdef QK_AVX512
            KQ_SHAPE(4, 1); KQ_SHAPE(4, 2); KQ_SHAPE(4, 4); KQ_SHAPE(2, 8);
#else
            KQ_SHAPE(4, 1); KQ_SHAPE(2, 2); KQ_SHAPE(1, 4); KQ_SHAPE(1, 8);
#endif
#undef KQ_SHAPE
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
#pragma omp parallel for if (M > 8) schedule(dynamic, qk_chunk(M))
    for (int m = 0; m < M; m++)
        kq_activations(x + (int64_t)m * K, K, xq + (int64_t)m * KQ_X_STRIDE(K), xd + (int64_t)m * nsb,
                       bs16 + (int64_t)m * nsb * (QK_K / 16), xb + (int64_t)m * nsb * (QK_K / QK));
#ifdef QK_AVX2
    if (M >= KQ_UNPACK_ROWS && !qk_row_invariant()) {
        int16_t *bs = bs16; /* Q6_K: the sums per 16; Q4_K / Q5_K: per 32 */
        if (type != KQ_Q6_K) {
            bs = malloc(sizeof(int16_t) * (size_t)M * nsb * 8);
            for (int64_t i = 0; bs && i < (int64_t)M * nsb * 8; i++) bs[i] = (int16_t)(bs16[2 * i] + bs16[2 * i + 1]);
        }
        int failed = !bs;
#pragma omp parallel
        {
            kq_lanes *buf = aligned_alloc(32, sizeof(kq_lanes) * (size_t)nsb);
            if (!buf || !bs) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(dynamic, qk_chunk((N + 7) / 8))
            for (int p = 0; p < (N + 7) / 8; p++) {
                if (!buf || !bs) continue;
                switch (type) {
                case KQ_Q4_K: kq_panel_lanes(KQ_Q4_K, p, xq, xd, bs, w, buf, y, M, N, K); break;
                case KQ_Q5_K: kq_panel_lanes(KQ_Q5_K, p, xq, xd, bs, w, buf, y, M, N, K); break;
                default: kq_panel_lanes(KQ_Q6_K, p, xq, xd, bs, w, buf, y, M, N, K); break;
                }
            }
            free(buf);
        }
        if (bs != bs16) free(bs);
        free(xq);
        free(xd);
        free(bs16);
        free(xb);
        return failed ? -1 : 0;
    }
#endif
#ifdef QK_AVX512
    if (M > 1) { /* a single row stays as it is (kq_rows_alone) */
#pragma omp parallel for if (M > 8) schedule(dynamic, qk_chunk(M))
        for (int m = 0; m < M; m++) kq_activation_lanes(xq + (int64_t)m * KQ_X_STRIDE(K), K);
    }
#endif
#pragma omp parallel for schedule(dynamic, qk_chunk((N + 3) / 4))
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

/* Many small matmuls in one parallel region (moe.c: the experts a step routes its tokens to, a
   few rows each): the activations of each are quantized once (kq_prepare, into kq_prepared_bytes
   of memory), then any thread computes any range of its weight rows (kq_prepared_rows), by the
   decode path of kq_linear (below KQ_UNPACK_ROWS rows; at any count under qk_row_invariant), so
   the numbers are kq_linear's. The layout of the buffer: xq, xd, bs16, xb, each 64-byte aligned. */
static inline size_t kq_align(size_t n) { return (n + 63) & ~(size_t)63; }

size_t kq_prepared_bytes(int M, int K) {
    const size_t nsb = (size_t)K / QK_K;
    return kq_align((size_t)M * KQ_X_STRIDE(K)) + kq_align(sizeof(float) * M * nsb) +
           kq_align(sizeof(int16_t) * M * nsb * (QK_K / 16)) + kq_align(sizeof(float) * M * nsb * (QK_K / QK));
}

typedef struct {
    int8_t *xq;
    float *xd;
    int16_t *bs16;
    float *xb;
} kq_acts;

static kq_acts kq_acts_at(void *buffer, int M, int K) {
    const size_t nsb = (size_t)K / QK_K;
    char *p = buffer;
    kq_acts a;
    a.xq = (int8_t *)p;
    p += kq_align((size_t)M * KQ_X_STRIDE(K));
    a.xd = (float *)p;
    p += kq_align(sizeof(float) * M * nsb);
    a.bs16 = (int16_t *)p;
    p += kq_align(sizeof(int16_t) * M * nsb * (QK_K / 16));
    a.xb = (float *)p;
    return a;
}

/* x [M, K] quantized into `buffer` as kq_linear's decode path takes it. Single-threaded. */
void kq_prepare(const float *x, int M, int K, void *buffer) {
    const int nsb = K / QK_K;
    const kq_acts a = kq_acts_at(buffer, M, K);
    for (int m = 0; m < M; m++)
        kq_activations(x + (int64_t)m * K, K, a.xq + (int64_t)m * KQ_X_STRIDE(K), a.xd + (int64_t)m * nsb,
                       a.bs16 + (int64_t)m * nsb * (QK_K / 16), a.xb + (int64_t)m * nsb * (QK_K / QK));
#ifdef QK_AVX512
    if (M > 1)
        for (int m = 0; m < M; m++) kq_activation_lanes(a.xq + (int64_t)m * KQ_X_STRIDE(K), K);
#endif
}

/* Columns [4 n4_begin, 4 n4_end) of y [M, N] = x w^T, x prepared by kq_prepare; type 0 Q4_K, 1
   Q5_K, 2 Q6_K (KQ_*). */
void kq_prepared_rows(int type, const void *prepared, const uint8_t *w, float *y, int M, int N, int K,
                      int n4_begin, int n4_end) {
    const kq_acts a = kq_acts_at((void *)prepared, M, K);
    for (int n4 = n4_begin; n4 < n4_end; n4++)
        switch (type) {
        case KQ_Q4_K: kq_panel(KQ_Q4_K, n4, a.xq, a.xd, a.bs16, a.xb, w, y, M, N, K); break;
        case KQ_Q5_K: kq_panel(KQ_Q5_K, n4, a.xq, a.xd, a.bs16, a.xb, w, y, M, N, K); break;
        default: kq_panel(KQ_Q6_K, n4, a.xq, a.xd, a.bs16, a.xb, w, y, M, N, K); break;
        }
}

/* Whether kq_linear of M rows takes the decode path that kq_prepared_rows computes. */
int kq_decode_rows(int M) {
#ifdef QK_AVX2
    return M < KQ_UNPACK_ROWS || qk_row_invariant();
#else
    (void)M;
    return 1;
#endif
}

typedef struct {
    int type;
    const uint8_t *w;
    int nsb;
} kq_matrix;

/* Row n of K-quant super-blocks, exactly as gguf dequantizes it. */
static void kq_row(const void *ctx, int n, float *values) {
    const kq_matrix *m = ctx;
    kq_block blk;
    for (int sb = 0; sb < m->nsb; sb++) {
        KQ_DECODE(m->type, m->w + ((int64_t)n * m->nsb + sb) * KQ_BYTES[m->type], &blk);
        float *o = values + sb * QK_K;
#ifdef QK_AVX2
        /* scale u - off (Q6_K's off: 32 scale), 8 values an instruction, each rounded once as
           gguf rounds it: d sc u has at most 25 significant bits, and the fused multiply-subtract
           rounds the exact scale u - off, which is gguf's scale (u - 32) or its d sc u - dmin m */
        for (int j = 0; j < 8; j++)
            for (int i = 0; i < QK; i += 8) {
                const __m128i bytes = _mm_loadl_epi64((const __m128i *)(blk.u[j] + i));
                const __m256 u = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
                _mm256_storeu_ps(o + j * QK + i, _mm256_fmsub_ps(_mm256_set1_ps(blk.scale[j][i / 16]), u,
                                                                  _mm256_set1_ps(blk.off[j][i / 16])));
            }
#else
        for (int j = 0; j < 8; j++)
            for (int i = 0; i < QK; i++) {
                const int s = i / 16;
                o[j * QK + i] = m->type == KQ_Q6_K ? blk.scale[j][s] * (float)((int)blk.u[j][i] - 32)
                                                   : blk.scale[j][s] * (float)blk.u[j][i] - blk.off[j][s];
            }
#endif
    }
}

/* Rows of K-quant super-blocks -> [N, K] of out_dtype (dequantize_rows). -1: no memory. */
static int kq_dequantize(int type, const uint8_t *w, void *out, int N, int K, int out_dtype) {
    const kq_matrix m = {type, w, K / QK_K};
    return dequantize_rows(kq_row, &m, out, N, K, out_dtype);
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
int q4_k_dequantize(const uint8_t *w, void *out, int N, int K, int out_dtype) {
    return kq_dequantize(KQ_Q4_K, w, out, N, K, out_dtype);
}
int q5_k_dequantize(const uint8_t *w, void *out, int N, int K, int out_dtype) {
    return kq_dequantize(KQ_Q5_K, w, out, N, K, out_dtype);
}
int q6_k_dequantize(const uint8_t *w, void *out, int N, int K, int out_dtype) {
    return kq_dequantize(KQ_Q6_K, w, out, N, K, out_dtype);
}
