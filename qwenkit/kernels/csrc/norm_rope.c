/* RMSNorm and NEOX rotary embedding on float32 rows. At decode a step's tensors are a few
   thousand floats, where torch's composite ops cost more in dispatch than in arithmetic. */
#include <math.h>

#include "kernels.h"

/* y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, rows of H floats; x rows `x_stride` apart. */
void rms_norm_f32(const float *x, int64_t x_stride, const float *w, float *y, int T, int H, float eps) {
#pragma omp parallel for if (T >= 16) schedule(dynamic, qk_chunk(T))
    for (int t = 0; t < T; t++) {
        const float *xt = x + t * x_stride;
        float *yt = y + (int64_t)t * H;
        double sum = 0.0;
        for (int i = 0; i < H; i++) sum += (double)xt[i] * xt[i];
        const float inv = 1.f / sqrtf((float)(sum / H) + eps);
        for (int i = 0; i < H; i++) yt[i] = (xt[i] * inv) * w[i];
    }
}

/* SwiGLU's activation: out[t] = silu(gate[t]) * up[t], x rows [gate (I floats), up (I floats)]. The
   module path and the fused decode step both call this, so a token's numbers do not depend on
   which of them computed it. */
void silu_and_mul_f32(const float *x, float *out, int T, int I) {
#pragma omp parallel for if (T >= 16) schedule(dynamic, qk_chunk(T))
    for (int t = 0; t < T; t++) {
        const float *g = x + (int64_t)t * 2 * I, *u = g + I;
        float *o = out + (int64_t)t * I;
        int i = 0;
#ifdef QK_AVX2
        /* silu(g) = g sigmoid(g), the sigmoid from z = e^-|g| (no overflow): 1 / (1 + z) for g >= 0,
           z / (1 + z) below */
        for (; i + 8 <= I; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i);
            const __m256 z = exp8_nonpositive(_mm256_or_ps(gv, _mm256_set1_ps(-0.f))); /* -|g| */
            const __m256 sigmoid = _mm256_div_ps(_mm256_blendv_ps(_mm256_set1_ps(1.f), z, gv),
                                                 _mm256_add_ps(_mm256_set1_ps(1.f), z));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid), _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < I; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

/* out[t, h] = x[t, h] * cos[t] + rotate_half(x[t, h]) * sin[t], with rotate_half(x) = (-x[D/2:],
   x[:D/2]). x: [T, heads, D] with token stride x_stride (heads D apart); cos, sin: [T, D]; out:
   [T, heads, D] contiguous. */
void rope_neox_f32(const float *x, int64_t x_stride, const float *cos, const float *sin, float *out, int T,
                   int heads, int D) {
    const int half = D / 2;
#pragma omp parallel for if (T >= 16) schedule(dynamic, qk_chunk(T))
    for (int t = 0; t < T; t++) {
        const float *c = cos + (int64_t)t * D, *s = sin + (int64_t)t * D;
        for (int h = 0; h < heads; h++) {
            const float *xh = x + t * x_stride + (int64_t)h * D;
            float *oh = out + ((int64_t)t * heads + h) * D;
            for (int i = 0; i < half; i++) {
                oh[i] = xh[i] * c[i] - xh[i + half] * s[i];
                oh[i + half] = xh[i + half] * c[i + half] + xh[i] * s[i + half];
            }
        }
    }
}
