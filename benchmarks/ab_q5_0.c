/* Q5_0 matmuls of two builds of the kernels, each on its own packing (q5_0_pack) of the same
   stored blocks: what a change of the Q5_0 layout or kernel is worth, where
   benchmarks/ab_kernel_sources.py (one model, one packing) cannot tell.

       gcc -O2 benchmarks/ab_q5_0.c -o /tmp/ab_q5_0 -ldl
       OLD=$(python -c "from pathlib import Path; from qwenkit.kernels import build
       print(build.build('avx2', csrc=Path('/tmp/old/qwenkit/kernels/csrc')))")
       NEW=$(python -c "from qwenkit.kernels import build; print(build.build('avx2'))")
       OMP_NUM_THREADS=2 /tmp/ab_q5_0 M N K ROUNDS $OLD $NEW     # e.g. 1 9728 896 300

   (/tmp/old: `git archive REV qwenkit/kernels/csrc | tar -x -C /tmp/old`.) Random blocks with
   small positive scales, 8 weight copies cycled (so that large matrices come from memory), the
   libraries' calls alternating with the first one's int8 kernel as a baseline. Prints the largest
   difference of each library's result from the first's (the same products in another order of
   float operations: small), then microseconds per call, min and median, and the median's ratio
   to int8's. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int (*q5_0_linear)(const float *, const uint8_t *, float *, int, int, int);
typedef void (*q5_0_pack)(const uint8_t *, uint8_t *, int, int);
typedef int (*int8_linear)(const float *, const int8_t *, const uint16_t *, float *, int, int, int);

enum { COPIES = 8, MAX_LIBS = 4 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 6 || argc > 5 + MAX_LIBS || atoi(argv[2]) % 8 || atoi(argv[3]) % 32) {
        fprintf(stderr, "usage: %s M N K ROUNDS lib.so [lib.so ...] (N a multiple of 8, K of 32; up to %d libraries)\n",
                argv[0], MAX_LIBS);
        return 2;
    }
    const int M = atoi(argv[1]), N = atoi(argv[2]), K = atoi(argv[3]), R = atoi(argv[4]), L = argc - 5, nb = K / 32;
    const size_t row_bytes = (size_t)nb * 22;
    float *x = malloc(sizeof(float) * M * K), *y = malloc(sizeof(float) * M * N);
    float *first = malloc(sizeof(float) * M * N);
    uint8_t *stored = malloc(N * row_bytes), *w[MAX_LIBS][COPIES];
    int8_t *w8[COPIES];
    uint16_t *scale8 = malloc(sizeof(uint16_t) * N);
    q5_0_linear linear[MAX_LIBS];
    srand(1);
    for (long i = 0; i < (long)M * K; i++) x[i] = (rand() % 2001 - 1000) * 1e-3f;
    for (int n = 0; n < N; n++) scale8[n] = 0x3c00; /* bfloat16 1.0 */
    for (int c = 0; c < COPIES; c++) {
        w8[c] = malloc((size_t)N * K);
        for (long i = 0; i < (long)N * K; i++) w8[c][i] = (int8_t)(rand() % 255 - 127);
    }
    for (int l = 0; l < L; l++) {
        void *lib = dlopen(argv[5 + l], RTLD_NOW | RTLD_LOCAL);
        if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 1; }
        linear[l] = (q5_0_linear)dlsym(lib, "q5_0_linear_q8");
        q5_0_pack pack = (q5_0_pack)dlsym(lib, "q5_0_pack");
        if (!linear[l] || !pack) { fprintf(stderr, "%s: no q5_0_linear_q8 / q5_0_pack\n", argv[5 + l]); return 1; }
        for (int c = 0; c < COPIES; c++) { /* the same stored blocks for every library */
            srand(100 + c);
            for (size_t i = 0; i < N * row_bytes; i++) stored[i] = (uint8_t)rand();
            for (size_t b = 0; b < (size_t)N * nb; b++) { /* fp16 scales between 2^-7 and 2^-5 */
                stored[b * 22] = (uint8_t)rand();
                stored[b * 22 + 1] = (uint8_t)(0x20 + rand() % 8);
            }
            w[l][c] = malloc(N * row_bytes);
            pack(stored, w[l][c], N, K);
        }
    }
    int8_linear int8 = (int8_linear)dlsym(dlopen(argv[5], RTLD_NOW | RTLD_LOCAL), "int8_linear_q8");
    linear[0](x, w[0][0], first, M, N, K);
    for (int l = 1; l < L; l++) {
        linear[l](x, w[l][0], y, M, N, K);
        double diff = 0, largest = 0;
        for (long i = 0; i < (long)M * N; i++) {
            const double d = y[i] > first[i] ? y[i] - first[i] : first[i] - y[i];
            const double a = first[i] < 0 ? -first[i] : first[i];
            diff = d > diff ? d : diff;
            largest = a > largest ? a : largest;
        }
        printf("%s against %s: largest difference %.3g (largest |y| %.3g)\n", argv[5 + l], argv[5], diff, largest);
    }
    double *t = malloc(sizeof(double) * (L + 1) * R);
    for (int r = 0; r < R; r++)
        for (int v = 0; v <= L; v++) {
            const int c = (r * (L + 1) + v) % COPIES;
            const double start = now();
            if (v == 0) int8(x, w8[c], scale8, y, M, N, K);
            else linear[v - 1](x, w[v - 1][c], y, M, N, K);
            t[v * R + r] = now() - start;
        }
    printf("M=%d N=%d K=%d, us per call, min / median (median / int8's):", M, N, K);
    double baseline = 1;
    for (int v = 0; v <= L; v++) {
        qsort(t + v * R, R, sizeof(double), by_value);
        const double median = t[v * R + R / 2];
        if (v == 0) baseline = median;
        printf("  %s %.0f / %.0f (%.2f)", v ? argv[4 + v] : "int8", t[v * R] * 1e6, median * 1e6, median / baseline);
    }
    printf("\n");
    return 0;
}
