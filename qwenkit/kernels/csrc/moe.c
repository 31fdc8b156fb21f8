/* A sparse MoE layer's experts kept in their GGUF K-quant blocks (Q4_K, Q5_K, Q6_K, as a GGUF file
   stores ffn_gate_exps / ffn_up_exps / ffn_down_exps: [experts, rows, bytes per row]), run in one
   call: each step reads only the blocks of the experts its tokens were routed to.

   As llama.cpp's ggml_mul_mat_id, the (token, choice) pairs are grouped by expert (a counting
   sort, stable: a token's pairs keep their order within an expert), and each expert in use
   multiplies its own rows through the K-quant kernels of kquant.c (gate, up, SwiGLU, down), each
   matmul split over the threads by weight rows. A token's output is then the sum of its top_k
   rows times their routing weights, in choice order, so it does not depend on which other tokens
   share the step (the matmuls' rows do not either below KQ_UNPACK_ROWS rows an expert, and at any
   count under qk_row_invariant). */
#include <stdlib.h>
#include <string.h>

#include "decode_layers.h"
#include "kernels.h"

/* Bytes of one row of k values in blocks of `format` (decode_layers.h's FORMAT_*), or -1. */
static int64_t moe_row_bytes(int format, int k) {
    switch (format) {
    case FORMAT_Q4_K: return (int64_t)k / 256 * 144;
    case FORMAT_Q5_K: return (int64_t)k / 256 * 176;
    case FORMAT_Q6_K: return (int64_t)k / 256 * 210;
    default: return -1;
    }
}

static int moe_matmul(int format, const float *x, const uint8_t *w, float *y, int M, int N, int K) {
    switch (format) {
    case FORMAT_Q4_K: return q4_k_linear_q8(x, w, y, M, N, K);
    case FORMAT_Q5_K: return q5_k_linear_q8(x, w, y, M, N, K);
    case FORMAT_Q6_K: return q6_k_linear_q8(x, w, y, M, N, K);
    default: return -2;
    }
}

/* out [T, hidden] = sum over k of weights[t, k] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e =
   expert_ids[t, k]. gate, up: [E, I, hidden] in blocks of gate_format / up_format; down: [E,
   hidden, I] in blocks of down_format (contiguous, experts one after another). Returns 0, -1 when
   out of memory, -2 for an expert id outside 0..E-1 or a format without a kernel here. */
int gguf_experts_q8(const float *x, int T, int hidden, const int64_t *expert_ids, const float *weights, int top_k,
                    int E, int I, const uint8_t *gate, int gate_format, const uint8_t *up, int up_format,
                    const uint8_t *down, int down_format, float *out) {
    const int64_t gate_bytes = moe_row_bytes(gate_format, hidden) * I, up_bytes = moe_row_bytes(up_format, hidden) * I;
    const int64_t down_bytes = moe_row_bytes(down_format, I) * hidden;
    if (gate_bytes < 0 || up_bytes < 0 || down_bytes < 0) return -2;
    const int pairs = T * top_k;
    int *start = calloc((size_t)E + 1, sizeof(int)), *order = malloc(sizeof(int) * (size_t)pairs);
    int *position = malloc(sizeof(int) * (size_t)pairs);
    if (!start || !order || !position) { free(start); free(order); free(position); return -1; }
    for (int i = 0; i < pairs; i++) {
        if (expert_ids[i] < 0 || expert_ids[i] >= E) { free(start); free(order); free(position); return -2; }
        start[expert_ids[i] + 1]++;
    }
    int most = 0; /* the most pairs one expert takes */
    for (int e = 0; e < E; e++) {
        most = start[e + 1] > most ? start[e + 1] : most;
        start[e + 1] += start[e];
    }
    int *fill = malloc(sizeof(int) * (size_t)E);
    float *buffer = malloc(sizeof(float) * ((size_t)most * (hidden + 5 * (size_t)I) + (size_t)pairs * hidden));
    if (!fill || !buffer) { free(start); free(order); free(position); free(fill); free(buffer); return -1; }
    memcpy(fill, start, sizeof(int) * (size_t)E);
    for (int i = 0; i < pairs; i++) { /* pair i = (token i / top_k, choice i % top_k) goes to slot position[i] */
        const int slot = fill[expert_ids[i]]++;
        order[slot] = i;
        position[i] = slot;
    }
    free(fill);
    float *xs = buffer, *g = xs + (size_t)most * hidden, *u = g + (size_t)most * I, *gu = u + (size_t)most * I;
    float *act = gu + (size_t)most * 2 * I, *ys = act + (size_t)most * I; /* ys: [pairs, hidden], by slot */
    int rc = 0;
    for (int e = 0; e < E && rc == 0; e++) {
        const int first = start[e], n = start[e + 1] - first;
        if (!n) continue;
        for (int j = 0; j < n; j++)
            memcpy(xs + (size_t)j * hidden, x + (size_t)(order[first + j] / top_k) * hidden, sizeof(float) * hidden);
        if ((rc = moe_matmul(gate_format, xs, gate + e * gate_bytes, g, n, I, hidden))) break;
        if ((rc = moe_matmul(up_format, xs, up + e * up_bytes, u, n, I, hidden))) break;
        for (int j = 0; j < n; j++) { /* [gate, up] rows, as silu_and_mul_f32 takes them */
            memcpy(gu + (size_t)j * 2 * I, g + (size_t)j * I, sizeof(float) * I);
            memcpy(gu + (size_t)j * 2 * I + I, u + (size_t)j * I, sizeof(float) * I);
        }
        silu_and_mul_f32(gu, act, n, I);
        rc = moe_matmul(down_format, act, down + e * down_bytes, ys + (size_t)first * hidden, n, hidden, I);
    }
    if (rc == 0) {
#pragma omp parallel for if (T >= 16) schedule(dynamic, qk_chunk(T))
        for (int t = 0; t < T; t++) {
            float *o = out + (size_t)t * hidden;
            for (int k = 0; k < top_k; k++) {
                const float w = weights[(size_t)t * top_k + k];
                const float *y = ys + (size_t)position[t * top_k + k] * hidden;
                if (k == 0)
                    for (int i = 0; i < hidden; i++) o[i] = w * y[i];
                else
                    for (int i = 0; i < hidden; i++) o[i] += w * y[i];
            }
        }
    }
    free(start);
    free(order);
    free(position);
    free(buffer);
    return rc;
}
