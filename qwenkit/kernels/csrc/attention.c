/* Decode attention read in place from the paged KV cache: one query token per sequence, its
   keys and values walked through the block table, each row read once (no gathered copy). One
   OpenMP task per (sequence, kv head): the scores of its G query heads against the context's
   keys, a softmax, then the weighted sum of the values. */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

/* q, out: [B, H, D]; k_cache, v_cache: [num_slots, KVH, D]; block_tables: [B, max_blocks];
   context_lens: [B]. Position l of sequence b is slot block_tables[b][l / block_size] * block_size
   + l % block_size. A sequence of context length 0 gets zeros. */
void paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                                const int32_t *block_tables, const int32_t *context_lens, float *out, int B, int H,
                                int KVH, int D, int block_size, int max_blocks, float scale) {
    const int G = H / KVH;
    const int64_t row = (int64_t)KVH * D; /* floats from one slot to the next */
#pragma omp parallel for schedule(dynamic, 1)
    for (int task = 0; task < B * KVH; task++) {
        const int b = task / KVH, kvh = task % KVH, L = context_lens[b];
        const int32_t *table = block_tables + (int64_t)b * max_blocks;
        const float *qb = q + ((int64_t)b * H + kvh * G) * D;
        float *ob = out + ((int64_t)b * H + kvh * G) * D;
        memset(ob, 0, sizeof(float) * G * D);
        if (L <= 0) continue;
        float *scores = malloc(sizeof(float) * G * L); /* [G, L] */
        for (int start = 0; start < L; start += block_size) {
            const float *k = k_cache + (int64_t)table[start / block_size] * block_size * row + kvh * D;
            const int n = L - start < block_size ? L - start : block_size;
            for (int i = 0; i < n; i++, k += row)
                for (int g = 0; g < G; g++) {
                    const float *qg = qb + g * D;
                    float s = 0.f;
                    for (int d = 0; d < D; d++) s += qg[d] * k[d];
                    scores[g * L + start + i] = s * scale;
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
            const float *v = v_cache + (int64_t)table[start / block_size] * block_size * row + kvh * D;
            const int n = L - start < block_size ? L - start : block_size;
            for (int i = 0; i < n; i++, v += row)
                for (int g = 0; g < G; g++) {
                    const float p = scores[g * L + start + i];
                    float *og = ob + g * D;
                    for (int d = 0; d < D; d++) og[d] += p * v[d];
                }
        }
        free(scores);
    }
}
