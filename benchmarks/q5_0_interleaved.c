/* A prototype, not the kernel qwenkit runs: Q5_0 weights stored 8 rows interleaved (a vector lane
   a weight row, as the prefill panels are unpacked today, but kept compressed: 176 bytes per
   8 rows x 32 values, the same size as the file), multiplied with the panel arithmetic (exact
   int16/int32 block sums, then one convert and one FMA per block for 8 rows) at every row count.
   Because every activation row takes the same arithmetic whatever the batch, such a kernel would
   be batch-invariant at any M without the separate decode path of today (q5_0_tile,
   q5_0_row_x8), and 8 rows cost far less than 8 single rows.

       gcc -O3 -mavx2 -mfma -mf16c -fopenmp benchmarks/q5_0_interleaved.c -o /tmp/q5x8 -ldl -lm
       LIB=$(python -c "from qwenkit.kernels import cpu; print(cpu.library().path)")
       OMP_NUM_THREADS=2 /tmp/q5x8 M N K ROUNDS $LIB      # e.g. 1 9728 896 300

   prints the prototype's largest error against a scalar reference of its layout, then
   microseconds per call (min, median; ratio to int8's median) of the library's int8 kernel, its
   Q5_0 kernel (the regrouped layout) and the prototype, called in turn on 8 copies of random
   weights each (so that large matrices come from memory). Measured on the AVX2 EPYC
   (docs/decode.md, "Q5_0 rows interleaved"). What turning it into the kernel needs is listed
   there: a packed layout that requires N % 8 == 0, and every reader of the layout rewritten. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define QK 32
#define PB 176 /* bytes per (panel, block) */
static double now(void){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9;}
static int cmp(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
static void quant_q8(const float *x, int K, int8_t *xq, float *xs, int32_t *xsum) {
    for (int j = 0; j < K / QK; j++) {
        float amax = 0; for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(x[j*QK+i]));
        float inv = amax > 0 ? 127.f / amax : 0; xs[j] = amax / 127.f; int s = 0;
        for (int i = 0; i < QK; i++) { xq[j*QK+i] = (int8_t)lrintf(x[j*QK+i]*inv); s += xq[j*QK+i]; }
        xsum[j] = 16 * s;
    }
}
static inline __m256i bcast4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
/* u-vector q of a (panel, block) */
static inline __attribute__((always_inline)) __m256i u_of(const uint8_t *pb, __m256i plane, int q) {
    const __m256i pair = _mm256_loadu_si256((const __m256i *)(pb + 16 + 32 * (q & 3)));
    const __m256i nib = q < 4 ? pair : _mm256_srli_epi16(pair, 4);
    const __m256i hi = q < 4 ? _mm256_slli_epi16(plane, 4 - q) : _mm256_srli_epi16(plane, q - 4);
    return _mm256_or_si256(_mm256_and_si256(nib, _mm256_set1_epi8(0x0f)), _mm256_and_si256(hi, _mm256_set1_epi8(0x10)));
}
#define IN_REG(v) __asm__("" : "+x"(v))
static inline __attribute__((always_inline)) void tile(const uint8_t *w, int nb, const int8_t *xq, const float *xs,
                                                       const int32_t *xsum, int K, int mr, float out[][8]) {
    __m256 acc[8];
    for (int m = 0; m < mr; m++) acc[m] = _mm256_setzero_ps();
    for (int j = 0; j < nb; j++) {
        const uint8_t *pb = w + (int64_t)j * PB;
        __builtin_prefetch(pb + 1024); __builtin_prefetch(pb + 1024 + 64); __builtin_prefetch(pb + 1024 + 128);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)pb));
        const __m256i plane = _mm256_loadu_si256((const __m256i *)(pb + 144));
        __m256i u[8];
        for (int q = 0; q < 8; q++) u[q] = u_of(pb, plane, q);
        for (int m = 0; m < mr; m++) {
            const int8_t *x = xq + (int64_t)m * K + j * QK;
            __m256i lo = _mm256_maddubs_epi16(u[0], bcast4(x));
            lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(u[1], bcast4(x + 4)));
            lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(u[2], bcast4(x + 8)));
            lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(u[3], bcast4(x + 12)));
            __m256i hi = _mm256_maddubs_epi16(u[4], bcast4(x + 16));
            hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(u[5], bcast4(x + 20)));
            hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(u[6], bcast4(x + 24)));
            hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(u[7], bcast4(x + 28)));
            const __m256i one = _mm256_set1_epi16(1);
            __m256i s = _mm256_add_epi32(_mm256_madd_epi16(lo, one), _mm256_madd_epi16(hi, one));
            s = _mm256_sub_epi32(s, _mm256_set1_epi32(xsum[m * nb + j]));
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, _mm256_set1_ps(xs[m * nb + j])), acc[m]);
        }
    }
    for (int m = 0; m < mr; m++) _mm256_storeu_ps(out[m], acc[m]);
}
static int8_t *g_xq; static float *g_xs; static int32_t *g_xsum;
static void proto(const float *x, const uint8_t *w, float *y, int M, int N, int K) {
    const int nb = K / QK;
    free(g_xq), free(g_xs), free(g_xsum); /* the last call's activations, kept for the check */
    int8_t *xq = malloc((size_t)M*K); float *xs = malloc(4*(size_t)M*nb); int32_t *xsum = malloc(4*(size_t)M*nb);
    for (int m = 0; m < M; m++) quant_q8(x + (int64_t)m*K, K, xq + (int64_t)m*K, xs + m*nb, xsum + m*nb);
    #pragma omp parallel for schedule(static)
    for (int p = 0; p < N / 8; p++) {
        const uint8_t *wp = w + (int64_t)p * nb * PB;
        for (int m0 = 0; m0 < M; m0 += 4) {
            int mr = M - m0 < 4 ? M - m0 : 4; float out[4][8];
            const int8_t *a = xq + (int64_t)m0*K; const float *s = xs + m0*nb; const int32_t *c = xsum + m0*nb;
            if (mr == 4) tile(wp, nb, a, s, c, K, 4, out);
            else if (mr == 1) tile(wp, nb, a, s, c, K, 1, out);
            else if (mr == 2) tile(wp, nb, a, s, c, K, 2, out);
            else tile(wp, nb, a, s, c, K, 3, out);
            for (int m = 0; m < mr; m++) memcpy(y + (int64_t)(m0+m)*N + 8*p, out[m], 32);
        }
    }
    g_xq = xq; g_xs = xs; g_xsum = xsum;
}
static float h2f(uint16_t h) { return _cvtsh_ss(h); }
int main(int argc, char **argv) {
    if (argc != 6 || atoi(argv[2]) % 8 || atoi(argv[3]) % QK) {
        fprintf(stderr, "usage: %s M N K ROUNDS libqwenkit.so (N a multiple of 8, K of 32)\n", argv[0]);
        return 2;
    }
    int M = atoi(argv[1]), N = atoi(argv[2]), K = atoi(argv[3]), R = atoi(argv[4]); const int nb = K / QK;
    void *lib = dlopen(argv[5], RTLD_NOW);
    if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    int (*q5)(const float*, const uint8_t*, float*, int,int,int) = dlsym(lib, "q5_0_linear_q8");
    int (*i8)(const float*, const int8_t*, const uint16_t*, float*, int,int,int) = dlsym(lib, "int8_linear_q8");
    enum { C = 8 };
    srand(1);
    float *x = malloc(4L*M*K), *y = malloc(4L*M*N), *y2 = malloc(4L*M*N);
    for (long i = 0; i < (long)M*K; i++) x[i] = (rand()%2001-1000)*1e-3f;
    uint8_t *wx[C], *wr[C]; int8_t *w8[C]; uint16_t *s8 = malloc(2L*N);
    for (int i = 0; i < N; i++) s8[i] = 0x3c00;
    for (int c = 0; c < C; c++) {
        wx[c] = malloc((long)N*nb*22); wr[c] = malloc((long)N*nb*22); w8[c] = malloc((long)N*K);
        for (long i = 0; i < (long)N*nb*22; i++) { wx[c][i] = rand(); wr[c][i] = rand(); }
        for (long i = 0; i < (long)N*K; i++) w8[c][i] = rand()%255-127;
        for (long pb = 0; pb < (long)N/8*nb; pb++) for (int r = 0; r < 8; r++) { wx[c][pb*PB+2*r] = rand()%256; wx[c][pb*PB+2*r+1] = 0x20; }
        for (long b = 0; b < (long)N*nb; b++) { wr[c][b*22] = 0; wr[c][b*22+1] = 0x20; } /* approx: scales small (layout differs, speed only) */
    }
    /* check proto against scalar reference on copy 0 */
    proto(x, wx[0], y, M, N, K);
    double maxerr = 0, maxv = 0;
    for (int m = 0; m < M; m++) for (int n = 0; n < N; n++) {
        const uint8_t *base = wx[0] + (int64_t)(n/8)*nb*PB; int r = n % 8; double tot = 0;
        for (int j = 0; j < nb; j++) {
            const uint8_t *pb = base + (int64_t)j*PB; uint16_t h; memcpy(&h, pb + 2*r, 2); int32_t s = 0;
            for (int k = 0; k < QK; k++) {
                int q = k / 4, v = k % 4, i = 4*r + v;
                int nib = (pb[16 + 32*(q&3) + i] >> (q < 4 ? 0 : 4)) & 15;
                int bit = (pb[144 + i] >> q) & 1;
                s += (nib + 16*bit - 16) * g_xq[(int64_t)m*K + j*QK + k];
            }
            tot += (double)s * h2f(h) * g_xs[m*nb + j];
        }
        double e = fabs(tot - y[(int64_t)m*N + n]); if (e > maxerr) maxerr = e; if (fabs(tot) > maxv) maxv = fabs(tot);
    }
    printf("check: max err %.3g of max |y| %.3g\n", maxerr, maxv);
    double *t = malloc(sizeof(double)*3*R);
    for (int r = 0; r < R; r++) for (int v = 0; v < 3; v++) {
        int c = (r*3 + v) % C; double a = now();
        if (v == 0) i8(x, w8[c], s8, y2, M, N, K); else if (v == 1) q5(x, wr[c], y2, M, N, K); else proto(x, wx[c], y, M, N, K);
        t[v*R + r] = now() - a;
    }
    const char *names[3] = {"int8", "q5_0 now", "q5_0 x8"};
    printf("M=%d N=%d K=%d:", M, N, K);
    double med0 = 0;
    for (int v = 0; v < 3; v++) { qsort(t + v*R, R, sizeof(double), cmp); double med = t[v*R + R/2]; if (!v) med0 = med;
        printf("  %s min %.0f med %.0f (%.2f)", names[v], t[v*R]*1e6, med*1e6, med/med0); }
    printf("\n");
}
