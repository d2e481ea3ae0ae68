/* The small operations between a layer's matmuls, a row at a time: RMSNorm, SiLU(gate) x up and the rotary
   embedding of a pass's queries and keys (for `rope_attend`, attend.c). Each in bfloat16 (every product, sum
   and quotient rounded to bf16 as torch rounds each operation of a bf16 model) or float32. Eager passes
   call them instead of the 8 (RMSNorm), 2 (SiLU x up) and ~20 (rope, the cache writes, the attention's
   conversions) torch operations a layer they stand for, each a few microseconds of dispatch
   (`cpu_matmul.enable_small_ops` has the measured step times).

   Rows are independent (split over threads), so a row's result never depends on the pass width. The rotary
   embedding is torch's arithmetic exactly (bit for bit the model's own operations: products and sums of two
   values each rounded); RMSNorm differs from torch's only in the order its squares are summed, SiLU in its
   exponential (within 2 ulp of float32's). No fused multiply-adds in this file: a product and a sum are two
   roundings here, as they are in torch's separate operations (clang contracts only within one expression,
   and the expressions below never hold both). */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#include "common.h"

/* e^x, within 2 ulp (Cody-Waite reduction by ln 2 in two parts, cephes' polynomial); 0 below -87.33,
   +inf above 88.72, NaN for NaN */
static inline float exp_f(float x) {
    const float c = x < -87.33f ? -87.33f : x > 88.72f ? 88.72f : x;
    const float t = c * 1.44269504088896341f;
    const float n = (t + 12582912.0f) - 12582912.0f;  /* t rounded to an integer: |t| < 2^22 */
    const float hi = n * 0.693145751953125f;  /* exact: ln 2's top bits times |n| <= 128 */
    const float lo = n * 1.428606765330187e-06f;
    const float r = (c - hi) - lo;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float rr = r * r;
    const float e = p * rr + r + 1.0f;
    const int32_t ni = (int32_t)n, n1 = ni / 2, n2 = ni - n1;  /* 2^n as two factors: each a normal float */
    const int32_t b1 = (n1 + 127) << 23, b2 = (n2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, 4), memcpy(&s2, &b2, 4);
    const float y = e * s1 * s2;
    return x < -87.33f ? 0.0f : x > 88.72f ? INFINITY : y;
}

struct norm_ctx { int bf16; const void *x; int64_t H, xs; const void *w; float eps; void *y; };

static void norm_rows(void *ctx, int64_t r0, int64_t r1) {
    const struct norm_ctx *cx = ctx;
    const int64_t H = cx->H;
    for (int64_t r = r0; r < r1; r++) {
        float ss[16] = {0};
        if (cx->bf16) {
            const uint16_t *x = (const uint16_t *)cx->x + r * cx->xs, *w = cx->w;
            uint16_t *y = (uint16_t *)cx->y + r * H;
            for (int64_t i = 0; i < H; i++) {
                const float v = bf16_f32(x[i]), sq = v * v;
                ss[i % 16] += sq;
            }
            const float inv = 1.0f / sqrtf(sum_lanes(ss) / (float)H + cx->eps);
            for (int64_t i = 0; i < H; i++) y[i] = f32_bf16(bf16_f32(w[i]) * bf16_f32(f32_bf16(bf16_f32(x[i]) * inv)));
        } else {
            const float *x = (const float *)cx->x + r * cx->xs, *w = cx->w;
            float *y = (float *)cx->y + r * H;
            for (int64_t i = 0; i < H; i++) {
                const float sq = x[i] * x[i];
                ss[i % 16] += sq;
            }
            const float inv = 1.0f / sqrtf(sum_lanes(ss) / (float)H + cx->eps);
            for (int64_t i = 0; i < H; i++) y[i] = w[i] * (x[i] * inv);
        }
    }
}

/* y [M, H] = w * round(x * (1 / sqrt(mean(x^2) + eps))) per row of x [M, H] (row stride xs elements) */
void rms_norm(int bf16, const void *x, int64_t M, int64_t H, int64_t xs, const void *w, float eps, void *y,
              int threads) {
    struct norm_ctx c = {bf16, x, H, xs, w, eps, y};
    run_ranges(M, M * H >= (1 << 16) ? 1 : M, norm_rows, &c, threads);
}

struct silu_ctx { int bf16; const void *g, *u; int64_t I, gs, us; void *y; };

static void silu_rows(void *ctx, int64_t r0, int64_t r1) {
    const struct silu_ctx *cx = ctx;
    const int64_t I = cx->I;
    for (int64_t r = r0; r < r1; r++) {
        if (cx->bf16) {
            const uint16_t *g = (const uint16_t *)cx->g + r * cx->gs, *u = (const uint16_t *)cx->u + r * cx->us;
            uint16_t *y = (uint16_t *)cx->y + r * I;
            for (int64_t i = 0; i < I; i++) {
                const float a = bf16_f32(g[i]), d = 1.0f + exp_f(-a);
                y[i] = f32_bf16(bf16_f32(f32_bf16(a / d)) * bf16_f32(u[i]));
            }
        } else {
            const float *g = (const float *)cx->g + r * cx->gs, *u = (const float *)cx->u + r * cx->us;
            float *y = (float *)cx->y + r * I;
            for (int64_t i = 0; i < I; i++) {
                const float d = 1.0f + exp_f(-g[i]), s = g[i] / d;
                y[i] = s * u[i];
            }
        }
    }
}

/* y [M, I] = silu(g) * u, silu(g) = g / (1 + e^-g); g / u [M, I] with row strides gs / us elements */
void silu_mul(int bf16, const void *g, int64_t gs, const void *u, int64_t us, int64_t M, int64_t I, void *y,
              int threads) {
    struct silu_ctx c = {bf16, g, u, I, gs, us, y};
    run_ranges(M, M * I >= (1 << 15) ? 1 : M, silu_rows, &c, threads);
}

/* One head's row x [D] rotated (torch's `x * cos + rotate_half(x) * sin`, then times `qs` unless it is NULL) into
   out [D] float32: rotate_half(x) = [-x[D/2:], x[:D/2]]. bf16: x / cos / sin / qs bf16, each operation
   rounded to bf16 (the result a bf16 value held as float32). */
void rope_row(int bf16, const void *x, const void *cos, const void *sin, const void *qs, int64_t D, float *out) {
    const int64_t h = D / 2;
    if (bf16) {
        const uint16_t *xb = x, *cb = cos, *sb = sin;
        for (int64_t c = 0; c < D; c++) {
            const float a = bf16_f32(xb[c]), b = c < h ? -bf16_f32(xb[c + h]) : bf16_f32(xb[c - h]);
            const float p = bf16_f32(f32_bf16(a * bf16_f32(cb[c]))), q = bf16_f32(f32_bf16(b * bf16_f32(sb[c])));
            const float v = bf16_f32(f32_bf16(p + q));
            out[c] = qs ? bf16_f32(f32_bf16(v * bf16_f32(*(const uint16_t *)qs))) : v;
        }
    } else {
        const float *xf = x, *cf = cos, *sf = sin;
        for (int64_t c = 0; c < D; c++) {
            const float a = xf[c], b = c < h ? -xf[c + h] : xf[c - h];
            const float p = a * cf[c], q = b * sf[c], v = p + q;
            out[c] = qs ? v * *(const float *)qs : v;
        }
    }
}
