"""The decoder layers of a CPU decode step as one C call.

A decode step of the default model is 24 layers of about twenty small operations each
(norms, the quantized matmuls, bias, RoPE, the cache write, attention, SiLU-and-mul,
residual adds). Run as torch modules, what is not matmul cost ~8.5 ms of a ~40 ms step
at one token (measured: docs/decode.md): Python, module calls, tensor allocation and
dispatch, none of it arithmetic. Here the whole stack after the embedding is one ctypes
call that walks the layers in C, reusing the kernels the module path calls one at a time
(`quant_kernels`, `paged_attention`, `cpu_ops`: their sources are compiled into this one
library), so the numbers are those of the module path up to float summation order.

It applies where every matmul of every layer has a native kernel: float32 activations on
CPU, dense MLPs (not MoE), each projection an int8 or GGUF Q5_0 `QuantLinear`, and the
kernels built. `FusedDecode.build` returns None otherwise and the runner keeps the module
path. `QWENKIT_NATIVE_KERNELS=0` turns it off with the other kernels.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from qwenkit.models import cpu_ops, native, paged_attention, quant, quant_kernels
from qwenkit.models.attention import AttentionMetadata
from qwenkit.models.layers import MLP, QwenForCausalLM
from qwenkit.models.quant import INT8, Q5_0, QuantLinear

_LAYERS_SOURCE = r"""
enum { FORMAT_INT8 = 0, FORMAT_Q5_0 = 1 };

typedef struct {
    int32_t format, n, k;
    const void *weight;      /* int8 [n, k], or Q5_0 blocks [n, k / 32 * 22] */
    const uint16_t *scale;   /* int8: bfloat16 [n] */
    const float *bias;       /* [n] or NULL */
} fd_linear;

typedef struct {
    fd_linear qkv, o, gate_up, down;
    const float *input_norm, *post_norm, *q_norm, *k_norm;  /* q_norm, k_norm: [head_dim] or NULL */
    float *k_cache, *v_cache;                               /* [num_slots, kv_heads, head_dim] */
} fd_layer;

typedef struct {
    int32_t hidden, heads, kv_heads, head_dim, intermediate;
    float eps, scale;
} fd_dims;

static int fd_matmul(const fd_linear *l, const float *x, float *y, int M) {
    const int rc = l->format == FORMAT_INT8 ? int8_linear_q8(x, l->weight, l->scale, y, M, l->n, l->k)
                                            : q5_0_linear_q8(x, l->weight, y, M, l->n, l->k);
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
    const size_t per_token = (size_t)2 * hidden + qkv_n + 3 * H * D + 2 * kv_n + 3 * I;
    float *buffer = malloc(sizeof(float) * per_token * M);
    if (!buffer) return -1;
    float *x = buffer, *tmp = x + (size_t)M * hidden, *qkv = tmp + (size_t)M * hidden;
    float *qn = qkv + (size_t)M * qkv_n, *qr = qn + (size_t)M * H * D, *attn = qr + (size_t)M * H * D;
    float *kn = attn + (size_t)M * H * D, *kr = kn + (size_t)M * kv_n, *gate_up = kr + (size_t)M * kv_n;
    float *act = gate_up + (size_t)M * 2 * I;
    int rc = 0;
    for (int layer = 0; layer < num_layers && rc == 0; layer++) {
        const fd_layer *L = layers + layer;
        rms_norm_f32(h, hidden, L->input_norm, x, M, hidden, d->eps);
        if ((rc = fd_matmul(&L->qkv, x, qkv, M))) break;
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
            memcpy(L->k_cache + slots[t] * kv_n, kr + (int64_t)t * kv_n, sizeof(float) * kv_n);
            memcpy(L->v_cache + slots[t] * kv_n, qkv + (int64_t)t * qkv_n + (H + KVH) * D, sizeof(float) * kv_n);
        }
        paged_decode_attention_f32(qr, L->k_cache, L->v_cache, block_tables, context_lens, attn, M, H, KVH, D,
                                   block_size, max_blocks, d->scale);
        if ((rc = fd_matmul(&L->o, attn, tmp, M))) break;
        for (int64_t i = 0; i < (int64_t)M * hidden; i++) h[i] += tmp[i];
        rms_norm_f32(h, hidden, L->post_norm, x, M, hidden, d->eps);
        if ((rc = fd_matmul(&L->gate_up, x, gate_up, M))) break;
        for (int m = 0; m < M; m++) {
            const float *g = gate_up + (int64_t)m * 2 * I, *u = g + I;
            float *a = act + (int64_t)m * I;
            for (int i = 0; i < I; i++) a[i] = g[i] / (1.f + expf(-g[i])) * u[i];
        }
        if ((rc = fd_matmul(&L->down, act, tmp, M))) break;
        for (int64_t i = 0; i < (int64_t)M * hidden; i++) h[i] += tmp[i];
    }
    free(buffer);
    return rc;
}
"""


class _Linear(ctypes.Structure):
    _fields_ = [("format", ctypes.c_int32), ("n", ctypes.c_int32), ("k", ctypes.c_int32),
                ("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class _Dims(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in
                ("hidden", "heads", "kv_heads", "head_dim", "intermediate")] + [
                ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


_FORMATS = {INT8: 0, Q5_0: 1}


@functools.cache
def _library():
    source = quant_kernels._SOURCE + paged_attention._SOURCE + cpu_ops._SOURCE + _LAYERS_SOURCE
    lib = native.load_library("fused_decode", source)
    if lib is not None:
        lib.decode_layers.restype = ctypes.c_int
        lib.decode_layers.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 2 + [ctypes.c_void_p]
    return lib


def _pointer(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    if not t.is_contiguous():
        raise ValueError("fused decode needs contiguous parameters")
    return t.data_ptr()


def _linear(module) -> _Linear | None:
    """The C view of a projection, or None where it has no native kernel."""
    if not isinstance(module, QuantLinear) or module.format not in _FORMATS:
        return None
    if module.bias is not None and module.bias.dtype != torch.float32:
        return None
    scale = module.scale if module.format == INT8 else None
    return _Linear(_FORMATS[module.format], module.weight.shape[0], module.in_features,
                   _pointer(module.weight), _pointer(scale), _pointer(module.bias))


class FusedDecode:
    """Decode steps of `model` through `decode_layers`; built by `build`, which says whether it applies."""

    def __init__(self, model: QwenForCausalLM, layers: ctypes.Array, dims: _Dims, lib: ctypes.CDLL):
        self.model = model
        self._layers = layers  # holds the pointers into the model's parameters and the KV cache
        self._dims = dims
        self._lib = lib

    @classmethod
    def build(cls, model: QwenForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> FusedDecode | None:
        """The fused path for this model and cache, or None where it does not apply (see the module doc)."""
        if model.dtype != torch.float32 or any(k.device.type != "cpu" for k, _ in kv_caches):
            return None
        lib = _library()
        if lib is None:
            return None
        c = model.config
        layers = []
        for layer, (k_cache, v_cache) in zip(model.model.layers, kv_caches):
            attn, mlp = layer.self_attn, layer.mlp
            if not isinstance(mlp, MLP):
                return None
            linears = [_linear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if None in linears:
                return None
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                     attn.q_norm.weight if attn.q_norm is not None else None,
                     attn.k_norm.weight if attn.k_norm is not None else None)
            if any(n is not None and n.dtype != torch.float32 for n in norms):
                return None
            layers.append(_Layer(*linears, *map(_pointer, norms), _pointer(k_cache), _pointer(v_cache)))
        dims = _Dims(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                     c.intermediate_size, c.rms_norm_eps,
                     model.model.layers[0].self_attn.scale)
        return cls(model, (_Layer * len(layers))(*layers), dims, lib)

    @staticmethod
    def applies(num_seqs: int) -> bool:
        """Whether the module path would also run the native kernels on `num_seqs` float32 rows
        (its dispatch limit, `quant.MAX_NATIVE_KERNEL_TOKENS`): then the fused step computes the same."""
        return num_seqs <= quant.MAX_NATIVE_KERNEL_TOKENS

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states [num_seqs, hidden] (after the last norm) of a decode step: input_ids,
        positions [num_seqs] and the step's decode metadata, as the module path takes them."""
        d = meta.decode
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        tables, context_lens = d.block_tables.to(torch.int32).contiguous(), d.context_lens.to(torch.int32).contiguous()
        inner = self.model.model
        h = inner.embed_tokens(input_ids).to(torch.float32).contiguous()
        cos, sin = (t.contiguous() for t in inner.rotary_emb(positions))
        num_seqs = h.shape[0]
        if self._lib.decode_layers(ctypes.addressof(self._layers), len(self._layers), ctypes.addressof(self._dims),
                                   h.data_ptr(), num_seqs, cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
                                   tables.data_ptr(), tables.shape[1], d.block_size, context_lens.data_ptr()):
            raise MemoryError(f"fused decode: no memory for the step's buffers ({num_seqs} sequences)")
        return inner.norm(h)
