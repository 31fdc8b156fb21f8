/* Prints the layout of the structs in qwenkit/kernels/csrc/decode_layers.h as "name value" lines:
   each struct's size, each field's offset, each FORMAT_* value. tests/test_kernels.py compiles
   it against the header and compares with the ctypes mirrors in qwenkit/kernels/cpu.py: a field
   missing here, in the header or in the mirror moves an offset or a size, or leaves a name out. */
#include <stddef.h>
#include <stdio.h>

#include "decode_layers.h"

#define SIZE(type) printf(#type " %zu\n", sizeof(type))
#define OFFSET(type, field) printf(#type "." #field " %zu\n", offsetof(type, field))
#define VALUE(name) printf(#name " %d\n", (int)(name))

int main(void) {
    SIZE(fd_linear);
    OFFSET(fd_linear, format);
    OFFSET(fd_linear, n);
    OFFSET(fd_linear, k);
    OFFSET(fd_linear, num_parts);
    OFFSET(fd_linear, weight);
    OFFSET(fd_linear, scale);
    OFFSET(fd_linear, bias);

    SIZE(fd_layer);
    OFFSET(fd_layer, qkv);
    OFFSET(fd_layer, o);
    OFFSET(fd_layer, gate_up);
    OFFSET(fd_layer, down);
    OFFSET(fd_layer, input_norm);
    OFFSET(fd_layer, post_norm);
    OFFSET(fd_layer, q_norm);
    OFFSET(fd_layer, k_norm);
    OFFSET(fd_layer, k_cache);
    OFFSET(fd_layer, v_cache);

    SIZE(fd_dims);
    OFFSET(fd_dims, hidden);
    OFFSET(fd_dims, heads);
    OFFSET(fd_dims, kv_heads);
    OFFSET(fd_dims, head_dim);
    OFFSET(fd_dims, intermediate);
    OFFSET(fd_dims, kv_dtype);
    OFFSET(fd_dims, eps);
    OFFSET(fd_dims, scale);

    VALUE(FORMAT_INT8);
    VALUE(FORMAT_Q5_0);
    VALUE(FORMAT_Q4_K);
    VALUE(FORMAT_Q5_K);
    VALUE(FORMAT_Q6_K);
    VALUE(FORMAT_PARTS);
    return 0;
}
