/* A sparse MoE layer's experts kept in their GGUF K-quant blocks (Q4_K, Q5_K, Q6_K, as a GGUF file
   stores ffn_gate_exps / ffn_up_exps / ffn_down_exps: [experts, rows, bytes per row]), run in one
   call: each step reads only the blocks of the experts its tokens were routed to.

   As llama.cpp's ggml_mul_mat_id, the (token, choice) pairs are grouped by expert (a counting
   sort, stable: a token's pairs keep their order within an expert), and each expert in use
   multiplies its own rows through the K-quant kernels of kquant.c: gate and up, SwiGLU, down.
   An expert with few rows (decode: one or a few tokens each; below KQ_UNPACK_ROWS) is a few
   thin matmuls, and the step has many of them (8 routed experts x 3 matrices a token), so they
   run in one parallel region: the activations of each quantized once (kq_prepare), then every
   gate and up matrix of every expert split into ranges of 64 rows that the threads take as they
   come free, then every down matrix alike. Three barriers a layer, not one per matmul: on a
   shared machine a descheduled thread holds up each barrier (docs/decode.md#threads). Whole
   experts a thread (one barrier) measured 4.5x slower at one token beside other work (2 threads,
   load ~5): a descheduled thread then holds a whole expert's work, not 64 rows. An expert
   with many rows (prefill) takes kq_linear's panel path, a matmul at a time.

   A token's output is the sum of its top_k rows times their routing weights, in choice order;
   an expert's rows do not depend on the others in its batch (the decode path), so a token's
   numbers do not depend on which other tokens share the step, below KQ_UNPACK_ROWS rows an
   expert and at any count under qk_row_invariant. */
#include <stdlib.h>
#include <string.h>

#include "decode_layers.h"
#include "kernels.h"

#ifndef MOE_PANELS /* 4-row panels of weight rows a thread takes at a time (64 rows) */
#define MOE_PANELS 16
#endif

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
    default: return q6_k_linear_q8(x, w, y, M, N, K);
    }
}

static int kq_type(int format) { return format - FORMAT_Q4_K; } /* kquant.c's KQ_Q4_K, KQ_Q5_K, KQ_Q6_K */

/* gate and up outputs [n, I] each -> [n, 2I] rows (gate, up), SwiGLU'd into act [n, I]. */
static void moe_swiglu(const float *g, const float *u, float *gu, float *act, int n, int I) {
    for (int j = 0; j < n; j++) {
        memcpy(gu + (size_t)j * 2 * I, g + (size_t)j * I, sizeof(float) * I);
        memcpy(gu + (size_t)j * 2 * I + I, u + (size_t)j * I, sizeof(float) * I);
    }
    silu_and_mul_f32(gu, act, n, I);
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
    for (int i = 0; i < pairs; i++)
        if (expert_ids[i] < 0 || expert_ids[i] >= E) return -2;
    /* start[e]: expert e's first slot; slot s holds pair order[s] = (token order[s] / top_k, choice
       order[s] % top_k); position[i]: pair i's slot. small: the experts in use on the decode path. */
    int *start = calloc((size_t)E + 1, sizeof(int)), *fill = malloc(sizeof(int) * (size_t)E);
    int *order = malloc(sizeof(int) * (size_t)pairs), *position = malloc(sizeof(int) * (size_t)pairs);
    int *small = malloc(sizeof(int) * (size_t)E);
    size_t *in_at = malloc(sizeof(size_t) * (size_t)E), *act_at = malloc(sizeof(size_t) * (size_t)E);
    /* by slot: x rows [pairs, hidden], gate and up outputs [pairs, I] each, [gate, up] [pairs, 2I],
       SwiGLU [pairs, I], down outputs [pairs, hidden] */
    float *buffer = malloc(sizeof(float) * (size_t)pairs * (2 * (size_t)hidden + 5 * (size_t)I));
    char *prepared = NULL;
    int rc = -1;
    if (!start || !fill || !order || !position || !small || !in_at || !act_at || !buffer) goto done;
    for (int i = 0; i < pairs; i++) start[expert_ids[i] + 1]++;
    for (int e = 0; e < E; e++) start[e + 1] += start[e];
    memcpy(fill, start, sizeof(int) * (size_t)E);
    for (int i = 0; i < pairs; i++) {
        const int slot = fill[expert_ids[i]]++;
        order[slot] = i;
        position[i] = slot;
    }
    float *xs = buffer, *g = xs + (size_t)pairs * hidden, *u = g + (size_t)pairs * I, *gu = u + (size_t)pairs * I;
    float *act = gu + (size_t)pairs * 2 * I, *ys = act + (size_t)pairs * I;
    int num_small = 0;
    size_t prepared_bytes = 0;
    for (int e = 0; e < E; e++) {
        const int n = start[e + 1] - start[e];
        if (!n || !kq_decode_rows(n)) continue;
        small[num_small++] = e;
        in_at[e] = prepared_bytes;
        prepared_bytes += kq_prepared_bytes(n, hidden);
        act_at[e] = prepared_bytes;
        prepared_bytes += kq_prepared_bytes(n, I);
    }
    prepared = aligned_alloc(64, prepared_bytes + 64);
    if (!prepared) goto done;
    const int up_units = (I + 4 * MOE_PANELS - 1) / (4 * MOE_PANELS);
    const int down_units = (hidden + 4 * MOE_PANELS - 1) / (4 * MOE_PANELS);
    const int n4_up = (I + 3) / 4, n4_down = (hidden + 3) / 4;
#pragma omp parallel if (num_small > 0)
    {
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < num_small; i++) {
            const int e = small[i], first = start[e], n = start[e + 1] - first;
            for (int j = 0; j < n; j++)
                memcpy(xs + (size_t)(first + j) * hidden, x + (size_t)(order[first + j] / top_k) * hidden,
                       sizeof(float) * hidden);
            kq_prepare(xs + (size_t)first * hidden, n, hidden, prepared + in_at[e]);
        }
#pragma omp for schedule(dynamic, 1)
        for (int unit = 0; unit < num_small * 2 * up_units; unit++) {
            const int e = small[unit / (2 * up_units)], is_up = unit / up_units % 2, part = unit % up_units;
            const int first = start[e], n = start[e + 1] - first, n4 = n4_up;
            const int begin = part * MOE_PANELS, end = begin + MOE_PANELS < n4 ? begin + MOE_PANELS : n4;
            kq_prepared_rows(kq_type(is_up ? up_format : gate_format), prepared + in_at[e],
                             is_up ? up + e * up_bytes : gate + e * gate_bytes, (is_up ? u : g) + (size_t)first * I,
                             n, I, hidden, begin, end);
        }
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < num_small; i++) {
            const int e = small[i], first = start[e], n = start[e + 1] - first;
            moe_swiglu(g + (size_t)first * I, u + (size_t)first * I, gu + (size_t)first * 2 * I,
                       act + (size_t)first * I, n, I);
            kq_prepare(act + (size_t)first * I, n, I, prepared + act_at[e]);
        }
#pragma omp for schedule(dynamic, 1)
        for (int unit = 0; unit < num_small * down_units; unit++) {
            const int e = small[unit / down_units], part = unit % down_units;
            const int first = start[e], n = start[e + 1] - first, n4 = n4_down;
            const int begin = part * MOE_PANELS, end = begin + MOE_PANELS < n4 ? begin + MOE_PANELS : n4;
            kq_prepared_rows(kq_type(down_format), prepared + act_at[e], down + e * down_bytes,
                             ys + (size_t)first * hidden, n, hidden, I, begin, end);
        }
    }
    rc = 0;
    for (int e = 0; e < E && rc == 0; e++) { /* the experts with many rows: kq_linear's panels */
        const int first = start[e], n = start[e + 1] - first;
        if (!n || kq_decode_rows(n)) continue;
        for (int j = 0; j < n; j++)
            memcpy(xs + (size_t)(first + j) * hidden, x + (size_t)(order[first + j] / top_k) * hidden,
                   sizeof(float) * hidden);
        if ((rc = moe_matmul(gate_format, xs + (size_t)first * hidden, gate + e * gate_bytes, g + (size_t)first * I,
                             n, I, hidden)))
            break;
        if ((rc = moe_matmul(up_format, xs + (size_t)first * hidden, up + e * up_bytes, u + (size_t)first * I,
                             n, I, hidden)))
            break;
        moe_swiglu(g + (size_t)first * I, u + (size_t)first * I, gu + (size_t)first * 2 * I, act + (size_t)first * I,
                   n, I);
        rc = moe_matmul(down_format, act + (size_t)first * I, down + e * down_bytes, ys + (size_t)first * hidden,
                        n, hidden, I);
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
done:
    free(start);
    free(fill);
    free(order);
    free(position);
    free(small);
    free(in_at);
    free(act_at);
    free(buffer);
    free(prepared);
    return rc;
}
