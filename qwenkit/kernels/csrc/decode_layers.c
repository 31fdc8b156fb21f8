/* The decoder layers of a CPU decode step as one call: a decode step of the default model is 24
   layers of about twenty small operations each, which as torch modules cost more in Python and
   dispatch than in arithmetic (docs/decode.md). Each layer calls the same kernels the module path
   calls one at a time, so the numbers are those of the module path up to float summation order. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "decode_layers.h"
#include "kernels.h"

/* y [M, l->n] = x [M, l->k] W^T (+ bias). scratch: room for [M, l->n] floats, used by a matrix of
   parts (each part's kernel writes whole rows of its own width). */
static int fd_matmul(const fd_linear *l, const float *x, float *y, int M, float *scratch) {
    int rc = -1;
    if (l->format == FORMAT_PARTS) {
        const fd_linear *parts = l->weight;
        rc = 0;
        for (int p = 0, first = 0; p < l->num_parts && rc == 0; first += parts[p++].n) {
            if ((rc = fd_matmul(parts + p, x, scratch, M, NULL))) break;
            for (int m = 0; m < M; m++)
                memcpy(y + (int64_t)m * l->n + first, scratch + (int64_t)m * parts[p].n, sizeof(float) * parts[p].n);
        }
    } else switch (l->format) {
    case FORMAT_INT8: rc = int8_linear_q8(x, l->weight, l->scale, y, M, l->n, l->k); break;
    case FORMAT_Q5_0: rc = q5_0_linear_q8(x, l->weight, y, M, l->n, l->k); break;
    case FORMAT_Q4_K: rc = q4_k_linear_q8(x, l->weight, y, M, l->n, l->k); break;
    case FORMAT_Q5_K: rc = q5_k_linear_q8(x, l->weight, y, M, l->n, l->k); break;
    case FORMAT_Q6_K: rc = q6_k_linear_q8(x, l->weight, y, M, l->n, l->k); break;
    }
    if (rc == 0 && l->bias)
        for (int m = 0; m < M; m++)
            for (int i = 0; i < l->n; i++) y[(int64_t)m * l->n + i] += l->bias[i];
    return rc;
}

/* h: [M, hidden], the residual stream, updated in place through every layer. cos, sin: [M,
   head_dim] (scaled as the model's rotary embedding gives them); slots: [M] cache slot of each
   token; block_tables: [M, max_blocks] of blocks of block_size slots; context_lens: [M]
   (including this token). Returns 0, or -1 when out of memory. */
int decode_layers(const fd_layer *layers, int num_layers, const fd_dims *d, float *h, int M,
                  const float *cos, const float *sin, const int64_t *slots, const int32_t *block_tables,
                  int max_blocks, int block_size, const int32_t *context_lens) {
    const int H = d->heads, KVH = d->kv_heads, D = d->head_dim, hidden = d->hidden, I = d->intermediate;
    const int qkv_n = (H + 2 * KVH) * D, kv_n = KVH * D;
    int widest = qkv_n > 2 * I ? qkv_n : 2 * I; /* the widest output of a matrix, for fd_matmul's scratch */
    widest = widest > hidden ? widest : hidden;
    const size_t per_token = (size_t)2 * hidden + qkv_n + 3 * H * D + 2 * kv_n + 3 * I + widest;
    float *buffer = malloc(sizeof(float) * per_token * M);
    if (!buffer) return -1;
    float *x = buffer, *tmp = x + (size_t)M * hidden, *qkv = tmp + (size_t)M * hidden;
    float *qn = qkv + (size_t)M * qkv_n, *qr = qn + (size_t)M * H * D, *attn = qr + (size_t)M * H * D;
    float *kn = attn + (size_t)M * H * D, *kr = kn + (size_t)M * kv_n, *gate_up = kr + (size_t)M * kv_n;
    float *act = gate_up + (size_t)M * 2 * I, *scratch = act + (size_t)M * I;
    int rc = 0;
    for (int layer = 0; layer < num_layers && rc == 0; layer++) {
        const fd_layer *L = layers + layer;
        rms_norm_f32(h, hidden, L->input_norm, x, M, hidden, d->eps);
        if ((rc = fd_matmul(&L->qkv, x, qkv, M, scratch))) break;
        const float *q = qkv, *k = qkv + H * D;
        int64_t q_stride = qkv_n, k_stride = qkv_n;
        if (L->q_norm) {  /* Qwen3: RMSNorm over each head before the rotation */
            for (int t = 0; t < M; t++) {
                rms_norm_f32(qkv + (int64_t)t * qkv_n, D, L->q_norm, qn + (int64_t)t * H * D, H, D, d->eps);
                rms_norm_f32(qkv + (int64_t)t * qkv_n + H * D, D, L->k_norm, kn + (int64_t)t * kv_n, KVH, D, d->eps);
            }
            q = qn, k = kn, q_stride = H * D, k_stride = kv_n;
        }
        rope_neox_f32(q, q_stride, cos, sin, qr, M, H, D);
        rope_neox_f32(k, k_stride, cos, sin, kr, M, KVH, D);
        for (int t = 0; t < M; t++) {
            kv_store(L->k_cache, slots[t] * kv_n, d->kv_dtype, kr + (int64_t)t * kv_n, kv_n);
            kv_store(L->v_cache, slots[t] * kv_n, d->kv_dtype, qkv + (int64_t)t * qkv_n + (H + KVH) * D, kv_n);
        }
        paged_decode_attention_f32(qr, L->k_cache, L->v_cache, block_tables, context_lens, attn, M, H, KVH, D,
                                   block_size, max_blocks, d->scale, d->kv_dtype);
        if ((rc = fd_matmul(&L->o, attn, tmp, M, scratch))) break;
        for (int64_t i = 0; i < (int64_t)M * hidden; i++) h[i] += tmp[i];
        rms_norm_f32(h, hidden, L->post_norm, x, M, hidden, d->eps);
        if ((rc = fd_matmul(&L->gate_up, x, gate_up, M, scratch))) break;
        silu_and_mul_f32(gate_up, act, M, I);
        if ((rc = fd_matmul(&L->down, act, tmp, M, scratch))) break;
        for (int64_t i = 0; i < (int64_t)M * hidden; i++) h[i] += tmp[i];
    }
    free(buffer);
    return rc;
}
