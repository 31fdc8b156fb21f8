/* The weights of a fused CPU decode step (decode_layers.c), as qwenkit/kernels/cpu.py fills them:
   its ctypes Structures mirror these, field by field (tests/test_kernels.py checks the layout). */
#ifndef QWENKIT_DECODE_LAYERS_H
#define QWENKIT_DECODE_LAYERS_H

#include <stdint.h>

enum { FORMAT_INT8 = 0, FORMAT_Q5_0 = 1, FORMAT_Q4_K = 2, FORMAT_Q5_K = 3, FORMAT_Q6_K = 4, FORMAT_PARTS = 5 };

typedef struct {
    int32_t format, n, k;
    int32_t num_parts;     /* FORMAT_PARTS: weight is num_parts fd_linear (none of them parts), outputs side by side */
    const void *weight;    /* int8 [n, k], or GGUF blocks of the format, [n, bytes per row] */
    const uint16_t *scale; /* int8: bfloat16 [n] */
    const float *bias;     /* [n] or NULL */
} fd_linear;

typedef struct {
    fd_linear qkv, o, gate_up, down;
    const float *input_norm, *post_norm, *q_norm, *k_norm; /* q_norm, k_norm: [head_dim] or NULL */
    void *k_cache, *v_cache;                               /* [num_slots, kv_heads, head_dim] of kv_dtype */
} fd_layer;

typedef struct {
    int32_t hidden, heads, kv_heads, head_dim, intermediate;
    int32_t kv_dtype; /* kernels.h KV_F32, KV_F16, KV_BF16 */
    float eps, scale;
} fd_dims;

#endif
