#include "common.h"

/* ---- attention of a narrow pass over its KV cache window (`attend`): float32, 16 lanes per sum ----
   q [H, R, D] (the R = g x T rows of the query heads that share K/V head h, as `_sdpa_grouped` folds
   them), K / V rows of head h at k + h * hs + j * D, mask [T, W] bytes (row r reads row r % T), the
   keys j < keys (the committed ones and the pass's own: the rest of the window is never visible).
   Each row is computed alone, in the same order whatever R and the pass width: a row's result never
   depends on how many rows its pass has. Sums run in 16 independent lanes (vectorised without
   reassociation, so every build of any width adds in this order), then a fixed tree. */
#define LANES 16
typedef float v16 __attribute__((vector_size(64)));  /* 16 lanes, whatever the build's vector width */
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));

static inline float sum_v16(v16 a) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)a);  /* the same tree as sum_lanes: 8 + 8, 4 + 4, 2 + 2, 1 + 1 */
#else
    float t[16];
    memcpy(t, &a, sizeof t);
    return sum_lanes(t);
#endif
}

static inline float exp_nonpos(float x) {  /* e^x for x <= 0 (-inf: 0), relative error ~2e-7 */
    const float c = x < -87.0f ? -87.0f : x;
    const float t = c * 1.44269504088896341f;
    const float n = (t + 12582912.0f) - 12582912.0f;  /* round to nearest: |t| < 2^22 */
    const float r = (t - n) * 0.693147180559945309f;  /* |r| <= ln2 / 2 */
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, 4);
    return x < -87.0f ? 0.0f : p * two_n;
}

struct attend_ctx {
    const float *q;
    int64_t R, T, D;
    const float *k, *v;
    int64_t hs;
    const uint8_t *mask;
    int64_t W, keys;
    float scale;
    float *out;
    int failed;
};

static void attend_rows(void *ctx, int64_t i0, int64_t i1) {  /* rows i = h * R + r of every head h */
    struct attend_ctx *cx = ctx;
    const float *q = cx->q, *k = cx->k, *v = cx->v, scale = cx->scale;
    const int64_t R = cx->R, T = cx->T, D = cx->D, hs = cx->hs, W = cx->W, keys = cx->keys;
    const int64_t padded = (keys + LANES - 1) / LANES * LANES;
    const uint8_t *mask = cx->mask;
    float *out = cx->out;
    for (int64_t row = i0; row < i1; row++) {
        const int64_t h = row / R, r = row % R;
        {
            const float *qr = q + (h * R + r) * D;
            const uint8_t *mr = mask + (r % T) * W;
            const float *kh = k + h * hs, *vh = v + h * hs;
            float *o = out + (h * R + r) * D;
            float *s = malloc(padded * sizeof(float));
            if (!s) {
                __atomic_store_n(&cx->failed, 1, __ATOMIC_RELAXED);
                continue;
            }
            /* 4 keys at a time: independent sums in flight (one key's chain of multiply-adds and its
               lane sum would leave the core waiting on latency); each key's sum is the same */
            int64_t j = 0;
            for (; j + 4 <= keys; j += 4) {
                const float *k0 = kh + j * D;
                v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                for (int64_t c = 0; c < D; c += LANES) {
                    const v16 x = *(const v16u *)(qr + c);
                    a0 += x * *(const v16u *)(k0 + c);
                    a1 += x * *(const v16u *)(k0 + D + c);
                    a2 += x * *(const v16u *)(k0 + 2 * D + c);
                    a3 += x * *(const v16u *)(k0 + 3 * D + c);
                }
                s[j] = mr[j] ? sum_v16(a0) * scale : -INFINITY;
                s[j + 1] = mr[j + 1] ? sum_v16(a1) * scale : -INFINITY;
                s[j + 2] = mr[j + 2] ? sum_v16(a2) * scale : -INFINITY;
                s[j + 3] = mr[j + 3] ? sum_v16(a3) * scale : -INFINITY;
            }
            for (; j < keys; j++) {
                v16 a = {0};
                for (int64_t c = 0; c < D; c += LANES) a += *(const v16u *)(qr + c) * *(const v16u *)(kh + j * D + c);
                s[j] = mr[j] ? sum_v16(a) * scale : -INFINITY;
            }
            float top = -INFINITY;  /* stays -inf only if no key is visible: never (a row sees itself) */
            for (j = 0; j < keys; j++) top = s[j] > top ? s[j] : top;
            for (int64_t j = keys; j < padded; j++) s[j] = -INFINITY;
            if (top == -INFINITY) top = 0.0f;  /* every weight 0: the row's output 0, not NaN */
            float den[LANES] = {0};
            for (int64_t j0 = 0; j0 < padded; j0 += LANES)
                for (int l = 0; l < LANES; l++) {
                    s[j0 + l] = exp_nonpos(s[j0 + l] - top);
                    den[l] += s[j0 + l];
                }
            if (D == 64) {  /* the sums in registers (the usual head sizes); the same order as below */
                v16 o0 = {0}, o1 = {0}, o2 = {0}, o3 = {0};
                for (int64_t j = 0; j < keys; j++) {
                    if (s[j] == 0.0f) continue;
                    const float *vj = vh + j * D;
                    o0 += s[j] * *(const v16u *)vj, o1 += s[j] * *(const v16u *)(vj + 16);
                    o2 += s[j] * *(const v16u *)(vj + 32), o3 += s[j] * *(const v16u *)(vj + 48);
                }
                memcpy(o, &o0, 64), memcpy(o + 16, &o1, 64), memcpy(o + 32, &o2, 64), memcpy(o + 48, &o3, 64);
            } else if (D == 128) {
                v16 acc[8] = {{0}};
                for (int64_t j = 0; j < keys; j++) {
                    if (s[j] == 0.0f) continue;
                    for (int i = 0; i < 8; i++) acc[i] += s[j] * *(const v16u *)(vh + j * D + 16 * i);
                }
                memcpy(o, acc, sizeof acc);
            } else {
                for (int64_t c = 0; c < D; c++) o[c] = 0.0f;
                for (int64_t j = 0; j < keys; j++) {
                    if (s[j] == 0.0f) continue;
                    for (int64_t c = 0; c < D; c++) o[c] += s[j] * vh[j * D + c];
                }
            }
            const float sum = sum_lanes(den), inv = sum > 0.0f ? 1.0f / sum : 0.0f;
            for (int64_t c = 0; c < D; c++) o[c] *= inv;
            free(s);
        }
    }
}

/* Returns 0, or -1 where a row's scores could not be allocated (out then incomplete). */
int attend(const float *q, int64_t H, int64_t R, int64_t T, int64_t D, const float *k, const float *v, int64_t hs,
           const uint8_t *mask, int64_t W, int64_t keys, float scale, float *out, int threads) {
    struct attend_ctx c = {q, R, T, D, k, v, hs, mask, W, keys, scale, out, 0};
    /* small passes (a decode step's few rows over a short cache) on one thread */
    run_ranges(H * R, H * R * keys * D >= (1 << 18) ? 1 : H * R, attend_rows, &c, threads);
    return c.failed ? -1 : 0;
}

/* A narrow pass's attention from its projections, in one call (eager passes: it stands for the model's ~20
   torch operations a layer between the q / k / v projections and o_proj): q [T, nq * D] and k / v [T, nkv * D]
   (row strides qs / ks / vs elements, bf16 or float32 as `bf16` says) rotated by the pass's cos / sin [T, D]
   and q times qscale [T] (`rope_row`: the model's arithmetic, bit for bit), the new keys and values written as
   float32 into the cache at rows length .. length + T of each K / V head (kc / vc + head * hs + row * D),
   then `attend` over the first min(W, length + T) of those rows under mask [T, W]; out [T, nq * D] in the
   activations' dtype (rounded as the model's `.to` rounds). The query heads that share a K / V head are
   its rows, as `attend` takes them. Returns 0, or -1 where scratch memory could not be allocated. */
int rope_attend(int bf16, const void *q, int64_t qs, const void *k, int64_t ks, const void *v, int64_t vs,
                int64_t T, int64_t nq, int64_t nkv, int64_t D, const void *cos, const void *sin, const void *qscale,
                float *kc, float *vc, int64_t hs, int64_t length, const uint8_t *mask, int64_t W, float scale,
                void *out, int threads) {
    const size_t esz = bf16 ? 2 : 4;
    const char *qb = q, *kb = k, *vb = v, *cb = cos, *sb = sin, *xs = qscale;
    if (T < 1) return 0;
    float *qr = malloc((size_t)(nq * T * D) * sizeof(float) * 2);
    if (!qr) return -1;
    float *o = qr + nq * T * D;
    for (int64_t t = 0; t < T; t++) {
        const void *ct = cb + t * D * esz, *st = sb + t * D * esz;
        for (int64_t h = 0; h < nq; h++)  /* head h is row (h % g) * T + t of K / V head h / g: [nq, T, D] */
            rope_row(bf16, qb + (t * qs + h * D) * esz, ct, st, xs + t * esz, D, qr + (h * T + t) * D);
        for (int64_t h = 0; h < nkv; h++) {
            float *kr = kc + h * hs + (length + t) * D, *vr = vc + h * hs + (length + t) * D;
            rope_row(bf16, kb + (t * ks + h * D) * esz, ct, st, 0, D, kr);
            const char *vt = vb + (t * vs + h * D) * esz;
            for (int64_t c = 0; c < D; c++) vr[c] = bf16 ? bf16_f32(((const uint16_t *)vt)[c]) : ((const float *)vt)[c];
        }
    }
    const int64_t keys = W < length + T ? W : length + T;
    const int rc = attend(qr, nkv, nq / nkv * T, T, D, kc, vc, hs, mask, W, keys, scale, o, threads);
    for (int64_t t = 0; rc == 0 && t < T; t++)
        for (int64_t h = 0; h < nq; h++) {
            const float *src = o + (h * T + t) * D;
            if (bf16) {
                uint16_t *dst = (uint16_t *)out + t * nq * D + h * D;
                for (int64_t c = 0; c < D; c++) dst[c] = f32_bf16(src[c]);
            } else memcpy((float *)out + t * nq * D + h * D, src, D * sizeof(float));
        }
    free(qr);
    return rc;
}
