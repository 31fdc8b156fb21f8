/* What qwenkit's CPU kernels share: the functions one source file calls in another, small
   inline helpers, and the instruction set of this build. Every .c file here is compiled into
   one library per ISA variant (qwenkit/kernels/build.py); the variant's -march flags decide
   which of QK_AVX2 / QK_AVX512 / QK_AMX are defined, and each kernel takes the widest path
   it has for them. QK_NO_SIMD builds the plain C paths only (the "generic" variant). */
#ifndef QWENKIT_KERNELS_H
#define QWENKIT_KERNELS_H

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#if (defined(__AVX2__) || defined(__F16C__)) && !defined(QK_NO_SIMD)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(QK_NO_SIMD)
#define QK_AVX2 1
#endif
#if defined(QK_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__AVX512VNNI__)
#define QK_AVX512 1
#endif
#if defined(QK_AVX512) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define QK_AMX 1
#endif

/* The work split of the loops over weight rows: schedule(dynamic, qk_chunk(n)), about
   QK_CHUNKS_PER_THREAD chunks a thread, each taken by the next thread that comes free. On a
   machine where other programs run, the OS deschedules one of the team now and then; with
   static halves the whole step then waits for that thread's half, with chunks the others take
   all but the one it holds (measured in docs/decode.md#threads). Whichever thread takes an
   iteration computes its outputs with the same code, so the numbers do not depend on the split.
   In a parallel region, the team's size; outside, the size the next region will have. */
#define QK_CHUNKS_PER_THREAD 8
static inline int qk_chunk(int n) {
    const int chunks = QK_CHUNKS_PER_THREAD * (omp_in_parallel() ? omp_get_num_threads() : omp_get_max_threads());
    return n > chunks ? n / chunks : 1;
}

/* Tests only: the AVX-512 (and AMX) code built for an AVX2 CPU, the AVX-512 intrinsics taken from
   SIMDe's portable implementations and the AMX ones from emulate_amx.h, so that code whose
   instructions this CPU lacks still runs against the reference (tests/test_kernels.py). */
#ifdef QK_EMULATE_AVX512
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#undef _mm512_cvtepi32_ps /* not in SIMDe 0.7 */
#define _mm512_cvtepi32_ps(v)                                                                               \
    _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_cvtepi32_ps(_mm512_castsi512_si256(v))),            \
                       _mm256_cvtepi32_ps(_mm512_extracti64x4_epi64(v, 1)), 1)
#undef _mm512_madd_epi16 /* SIMDe 0.7 aliases it with the masked form's four arguments */
#define _mm512_madd_epi16(a, b) simde_mm512_madd_epi16(a, b)
/* Nor are these four (norm_rope.c's 16-bit rows): lane by lane, as the instructions define them. */
static inline __m512i qk_emulated_cvtepu16_epi32(__m256i h) {
    uint16_t in[16];
    int32_t out[16];
    memcpy(in, &h, sizeof in);
    for (int i = 0; i < 16; i++) out[i] = in[i];
    __m512i v;
    memcpy(&v, out, sizeof v);
    return v;
}
static inline __m256i qk_emulated_cvtepi32_epi16(__m512i v) { /* truncating, as vpmovdw */
    int32_t in[16];
    uint16_t out[16];
    memcpy(in, &v, sizeof in);
    for (int i = 0; i < 16; i++) out[i] = (uint16_t)in[i];
    __m256i h;
    memcpy(&h, out, sizeof h);
    return h;
}
static inline __m512 qk_emulated_cvtph_ps(__m256i h) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_cvtph_ps(_mm256_castsi256_si128(h))),
                              _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), 1);
}
static inline __m256i qk_emulated_cvtps_ph(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    return _mm256_set_m128i(
        _mm256_cvtps_ph(_mm256_castsi256_ps(_mm512_extracti64x4_epi64(bits, 1)), _MM_FROUND_TO_NEAREST_INT),
        _mm256_cvtps_ph(_mm256_castsi256_ps(_mm512_castsi512_si256(bits)), _MM_FROUND_TO_NEAREST_INT));
}
#undef _mm512_cvtepu16_epi32
#undef _mm512_cvtepi32_epi16
#undef _mm512_cvtph_ps
#undef _mm512_cvtps_ph
#define _mm512_cvtepu16_epi32(h) qk_emulated_cvtepu16_epi32(h)
#define _mm512_cvtepi32_epi16(v) qk_emulated_cvtepi32_epi16(v)
#define _mm512_cvtph_ps(h) qk_emulated_cvtph_ps(h)
#define _mm512_cvtps_ph(v, rounding) qk_emulated_cvtps_ph(v) /* callers round to nearest even */
#define QK_AVX512 1
#ifdef QK_EMULATE_AMX
#include "emulate_amx.h"
#define QK_AMX 1
#endif
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

static inline float hmax(__m256 v) { /* the largest of the 8 lanes */
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x for x <= 0, 8 at a time: Cephes' expf, 2^n times a polynomial in r = x - n ln 2 (relative
   error ~1e-7); exactly 1 at 0, exactly 0 below -87 and at -inf. Prefill attention's softmax
   (a score minus its row's running maximum; -inf: a masked key) and SwiGLU's sigmoid. */
static inline __m256 exp8_nonpositive(__m256 x) {
    const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_GE_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(two_n)), keep);
}

/* *p in every lane by one load (vbroadcastss from memory, no shuffle). In asm because compilers
   turn a broadcast of a value just stored into lane shuffles, the port the 8-row kernels are
   short of (docs/decode.md). */
static inline __m256 broadcast_load(const float *p) {
    __m256 v;
    __asm__("vbroadcastss %1, %0" : "=x"(v) : "m"(*p));
    return v;
}

/* Unsigned bytes u times signed bytes s, groups of four summed into 8 int32 lanes. AVX-512 VNNI:
   one vpdpbusd; AVX2: vpmaddubsw (pairs into int16, saturating) then vpmaddwd. The callers keep
   every pair below 2^15 (u <= 127 with |s| <= 127), so both give the same integers. */
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#ifdef QK_AVX512
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* acc plus the int16 products a b summed in pairs, per int32 lane. AVX-512 VNNI: one vpdpwssd;
   AVX2: vpmaddwd then vpaddd. The same integers either way: neither saturates (vpmaddwd's one
   overflow, both pairs -32768 * -32768, cannot happen with the callers' small scales). */
static inline __m256i madd_acc_epi16(__m256i acc, __m256i a, __m256i b) {
#ifdef QK_AVX512
    return _mm256_dpwssd_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

/* The 4 bytes at p in every 32-bit lane (one vpbroadcastd from memory): an activation's 4 values
   against a panel vector holding 4 values of each of 8 weight rows. */
static inline __m256i broadcast_4_bytes(const int8_t *p) {
    int32_t x;
    memcpy(&x, p, sizeof x);
    return _mm256_set1_epi32(x);
}

/* v, in a register, as it is at this point. gcc otherwise takes a tile's integer sums apart
   (integer addition being associative), computes all of their products first and spills them to
   the stack: 1.1-1.3x slower (kquant.c). */
#define IN_REGISTER(v) __asm__("" : "+v"(v))
/* The same for a 512-bit value; nothing under emulation, where that is a struct of two halves. */
#ifdef QK_EMULATE_AVX512
#define IN_REGISTER_512(v) ((void)(v))
#else
#define IN_REGISTER_512(v) IN_REGISTER(v)
#endif

/* v[r] (8 dwords each) -> v[g] holding dword g of every v[r] in lane r: 8 rows of weights turned
   into vectors of a lane a row (Q5_0's packing at load, the K-quant prefill panels). */
static inline __attribute__((always_inline)) void transpose_8x8_epi32(__m256i v[8]) {
    __m256i t[8], s[8];
    for (int h = 0; h < 2; h++) {
        __m256i *a = v + 4 * h, *u = t + 4 * h, *o = s + 4 * h;
        u[0] = _mm256_unpacklo_epi32(a[0], a[1]);
        u[1] = _mm256_unpackhi_epi32(a[0], a[1]);
        u[2] = _mm256_unpacklo_epi32(a[2], a[3]);
        u[3] = _mm256_unpackhi_epi32(a[2], a[3]);
        o[0] = _mm256_unpacklo_epi64(u[0], u[2]); /* dwords 0 | 4 of rows 4h .. 4h+3 */
        o[1] = _mm256_unpackhi_epi64(u[0], u[2]); /* 1 | 5 */
        o[2] = _mm256_unpacklo_epi64(u[1], u[3]); /* 2 | 6 */
        o[3] = _mm256_unpackhi_epi64(u[1], u[3]); /* 3 | 7 */
    }
    for (int g = 0; g < 4; g++) {
        v[g] = _mm256_permute2x128_si256(s[g], s[4 + g], 0x20);
        v[g + 4] = _mm256_permute2x128_si256(s[g], s[4 + g], 0x31);
    }
}
#endif

#ifdef QK_AVX512
/* a in lanes 0-7, b in lanes 8-15: the scales of two consecutive blocks of 32 values. */
static inline __m512 pair_ps(float a, float b) {
    return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1);
}
#endif

#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 16384
#endif
/* A matmul tile reads a few weight rows at once, interleaved (a block of each in turn), and the
   hardware prefetcher follows such short interleaved streams poorly: a one-token matmul of int8
   rows ran at ~60% of the machine's read bandwidth. So each step of a tile prefetches, in memory
   order, as many bytes as it reads, PREFETCH_BYTES past them: `tile` the tile's first weight
   row, `done` the bytes the tile has read before this step, `bytes` this step's. Tiles are whole
   rows, contiguous, so this runs ahead of the reads into the next tiles. */
static inline void prefetch_ahead(const void *tile, int64_t done, int bytes) {
    const char *p = (const char *)tile + PREFETCH_BYTES + done;
    for (int line = 0; line < bytes; line += 64) __builtin_prefetch(p + line, 0, 3);
}

/* KV cache element types (qwenkit/kernels/cpu.py KV_DTYPES): rows are converted to float32 as
   they are read and rounded to nearest-even as they are written, as torch's .to() does. */
enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2 };

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN, as torch gives it */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

static inline uint16_t f32_to_f16(float f) {
#if defined(__F16C__) && !defined(QK_NO_SIMD)
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    const uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return sign | 0x7e00;      /* NaN */
    if (abs >= 0x477ff000u) return sign | 0x7c00;     /* rounds past 65504: infinity */
    if (abs < 0x38800000u) {                          /* below 2^-14: a subnormal half, or zero */
        float magnitude;
        memcpy(&magnitude, &abs, sizeof magnitude);
        return sign | (uint16_t)lrintf(magnitude * 16777216.f); /* in units of 2^-24, to nearest even */
    }
    const uint32_t mant_odd = (abs >> 13) & 1;
    return sign | (uint16_t)((abs - 0x38000000u + 0xfffu + mant_odd) >> 13);
#endif
}

/* Row `index` (in elements) of a cache of kv_dtype, as n float32 values: the row itself for a
   float32 cache, else converted into tmp. */
static inline const float *kv_row(const void *cache, int64_t index, int kv_dtype, int n, float *tmp) {
    if (kv_dtype == KV_F32) return (const float *)cache + index;
    const uint16_t *h = (const uint16_t *)cache + index;
    int i = 0;
#ifdef QK_AVX2
    if (kv_dtype == KV_F16)
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(tmp + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    else
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(tmp + i, _mm256_castsi256_ps(_mm256_slli_epi32(
                                          _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(h + i))), 16)));
#endif
    for (; i < n; i++) tmp[i] = kv_dtype == KV_F16 ? f16_to_f32(h[i]) : bf16_to_f32(h[i]);
    return tmp;
}

/* n float32 values into row `index` (in elements) of a cache of kv_dtype. */
static inline void kv_store(void *cache, int64_t index, int kv_dtype, const float *x, int n) {
    if (kv_dtype == KV_F32) {
        memcpy((float *)cache + index, x, sizeof(float) * n);
        return;
    }
    uint16_t *h = (uint16_t *)cache + index;
    int i = 0;
#ifdef QK_AVX2
    if (kv_dtype == KV_F16)
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    else /* f32_to_bf16, 8 at a time */
        for (; i + 8 <= n; i += 8) {
            const __m256i u = _mm256_loadu_si256((const __m256i *)(x + i));
            const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
            __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
            const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                                   _mm256_set1_epi32(0x7f800000));
            r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
            r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08); /* the 8 halves in order, low 128 bits */
            _mm_storeu_si128((__m128i *)(h + i), _mm256_castsi256_si128(r));
        }
#endif
    for (; i < n; i++) h[i] = kv_dtype == KV_F16 ? f32_to_f16(x[i]) : f32_to_bf16(x[i]);
}

/* norm_rope.c */
void silu_and_mul_f32(const float *x, float *out, int T, int I);
void rms_norm_f32(const float *x, int64_t x_stride, const float *w, float *y, int T, int H, float eps);
void rope_neox_f32(const float *x, int64_t x_stride, const float *cos, const float *sin, float *out, int T,
                   int heads, int D);

/* The same on 16-bit rows (dtype KV_BF16 or KV_F16), and the fused residual add and attention
   prologue of a 16-bit model's prefill. */
void rms_norm_16bit(const uint16_t *x, int64_t x_stride, const uint16_t *w, uint16_t *y, int T, int H, float eps,
                    int dtype);
void add_rms_norm_16bit(const uint16_t *x, const uint16_t *residual, const uint16_t *w, uint16_t *y, uint16_t *sum,
                        int T, int H, float eps, int dtype);
void silu_and_mul_16bit(const uint16_t *x, uint16_t *out, int T, int I, int dtype);
int qk_norm_rope_cache_16bit(const uint16_t *qkv, int64_t qkv_stride, const uint16_t *cos, const uint16_t *sin,
                             const uint16_t *q_norm, const uint16_t *k_norm, float eps, uint16_t *q_out,
                             void *k_cache, void *v_cache, int kv_dtype, const int64_t *slots, int64_t num_slots,
                             int T, int H, int KVH, int D, int dtype);

/* attention.c */
void paged_decode_attention_f32(const float *q, const void *k_cache, const void *v_cache,
                                const int32_t *block_tables, const int32_t *context_lens, float *out, int B, int H,
                                int KVH, int D, int block_size, int max_blocks, float scale, int kv_dtype);
int paged_prefill_attention_f32(const float *q, const void *k_cache, const void *v_cache, const int32_t *block_tables,
                                const int32_t *query_start_loc, const int32_t *context_lens, float *out, int B, int H,
                                int KVH, int D, int block_size, int max_blocks, float scale, int kv_dtype);

/* quant.c */
void qk_set_row_invariant(int on);
int qk_row_invariant(void); /* set: every matmul takes its decode path whatever the row count */
void quantize_row_q8(const float *x, int K, int8_t *xq, float *xs);
int int8_linear_q8(const float *x, const int8_t *w, const uint16_t *scale, float *y, int M, int N, int K);
int q5_0_linear_q8(const float *x, const uint8_t *w, float *y, int M, int N, int K);
void q5_0_pack(const uint8_t *stored, uint8_t *out, int N, int K);
int q5_0_dequantize(const uint8_t *w, void *out, int N, int K, int out_dtype);
int q8_0_dequantize(const uint8_t *w, void *out, int N, int K, int out_dtype);
int dequantize_rows(void (*row)(const void *ctx, int n, float *values), const void *ctx, void *out, int N, int K,
                    int out_dtype);

/* kquant.c */
int q4_k_linear_q8(const float *x, const uint8_t *w, float *y, int M, int N, int K);
int q5_k_linear_q8(const float *x, const uint8_t *w, float *y, int M, int N, int K);
int q6_k_linear_q8(const float *x, const uint8_t *w, float *y, int M, int N, int K);
size_t kq_prepared_bytes(int M, int K);
void kq_prepare(const float *x, int M, int K, void *buffer);
void kq_prepared_rows(int type, const void *prepared, const uint8_t *w, float *y, int M, int N, int K,
                      int n4_begin, int n4_end);
int kq_decode_rows(int M);

/* moe.c */
int gguf_experts_q8(const float *x, int T, int hidden, const int64_t *expert_ids, const float *weights, int top_k,
                    int E, int I, const uint8_t *gate, int gate_format, const uint8_t *up, int up_format,
                    const uint8_t *down, int down_format, float *out);

#endif
