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

/* A row's scores against keys [0, keys): s[j] = q . k_j * scale where the mask lets the row see key j, else
   -inf. 4 keys at a time: independent sums in flight (one key's chain of multiply-adds and its lane sum
   would leave the core waiting on latency); each key's sum is the same. */
static void row_scores(const float *qr, const uint8_t *mr, const float *kh, int64_t keys, int64_t D, float scale,
                       float *s) {
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
}

/* The scores' softmax weights in place (unnormalised: e^(s - max), the padding to `padded` zero); returns
   1 / their sum (0 where no key is visible: never, a row sees itself; the row's output then 0, not NaN). */
static float row_softmax(float *s, int64_t keys, int64_t padded) {
    float top = -INFINITY;
    for (int64_t j = 0; j < keys; j++) top = s[j] > top ? s[j] : top;
    for (int64_t j = keys; j < padded; j++) s[j] = -INFINITY;
    if (top == -INFINITY) top = 0.0f;
    float den[LANES] = {0};
    for (int64_t j0 = 0; j0 < padded; j0 += LANES)
        for (int l = 0; l < LANES; l++) {
            s[j0 + l] = exp_nonpos(s[j0 + l] - top);
            den[l] += s[j0 + l];
        }
    const float sum = sum_lanes(den);
    return sum > 0.0f ? 1.0f / sum : 0.0f;
}

/* o [D] = sum over keys of s[j] * v_j (keys of weight 0 skipped), then times inv */
static void row_values(const float *s, const float *vh, int64_t keys, int64_t D, float inv, float *o) {
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
    for (int64_t c = 0; c < D; c++) o[c] *= inv;
}

#if defined(__AVX512F__)
/* 4 rows of one K / V head at once (a decode step's 4 query heads that share it): each key's and each
   value's row read once for the four, every row's sums the very operations `row_scores` / `row_values`
   make alone (the same chains, in the same order), so a row's result never depends on its neighbours.
   The 16 + 4 + 1 vectors of a score step and the 16 + 4 of a value step (64 columns at a time) fit
   AVX-512's 32 registers; other builds run the rows one by one. The keys' and values' rows 16 ahead are
   asked for as each step begins (a decode step's cache comes from memory: one layer's attention at the
   NLD-3B shape over 506 keys, its K / V evicted first, 561 -> 469 us; with them in the L3 cache, 259 ->
   166 us for the 4 rows at once; one Zen 5 core, session 14). */
#define PF_KEYS 16
static void group_scores(const float *const *qr, const uint8_t *const *mr, const float *kh, int64_t keys,
                         int64_t D, float scale, float *const *s) {
    int64_t j = 0;
    for (; j + 4 <= keys; j += 4) {
        const float *k0 = kh + j * D;
        for (int64_t u = 0; u < 4 * D; u += 16) __builtin_prefetch(k0 + PF_KEYS * D + u, 0, 3);
        v16 a[4][4] = {{{0}}};
        for (int64_t c = 0; c < D; c += LANES) {
            const v16 k0v = *(const v16u *)(k0 + c), k1v = *(const v16u *)(k0 + D + c);
            const v16 k2v = *(const v16u *)(k0 + 2 * D + c), k3v = *(const v16u *)(k0 + 3 * D + c);
            for (int g = 0; g < 4; g++) {
                const v16 x = *(const v16u *)(qr[g] + c);
                a[g][0] += x * k0v;
                a[g][1] += x * k1v;
                a[g][2] += x * k2v;
                a[g][3] += x * k3v;
            }
        }
        for (int g = 0; g < 4; g++)
            for (int u = 0; u < 4; u++) s[g][j + u] = mr[g][j + u] ? sum_v16(a[g][u]) * scale : -INFINITY;
    }
    for (int g = 0; g < 4; g++)  /* the last keys: as a row alone */
        for (int64_t jj = j; jj < keys; jj++) {
            v16 a = {0};
            for (int64_t c = 0; c < D; c += LANES) a += *(const v16u *)(qr[g] + c) * *(const v16u *)(kh + jj * D + c);
            s[g][jj] = mr[g][jj] ? sum_v16(a) * scale : -INFINITY;
        }
}

static void group_values(const float *const *s, const float *vh, int64_t keys, int64_t D, const float *inv,
                         float *const *o) {
    for (int64_t c0 = 0; c0 < D; c0 += 64) {
        v16 acc[4][4] = {{{0}}};
        for (int64_t j = 0; j < keys; j++) {
            const float *vj = vh + j * D + c0;
            if (c0 == 0) for (int64_t u = 0; u < D; u += 16) __builtin_prefetch(vh + (j + PF_KEYS) * D + u, 0, 3);
            const v16 v0 = *(const v16u *)vj, v1 = *(const v16u *)(vj + 16);
            const v16 v2 = *(const v16u *)(vj + 32), v3 = *(const v16u *)(vj + 48);
            for (int g = 0; g < 4; g++) {
                if (s[g][j] == 0.0f) continue;
                acc[g][0] += s[g][j] * v0;
                acc[g][1] += s[g][j] * v1;
                acc[g][2] += s[g][j] * v2;
                acc[g][3] += s[g][j] * v3;
            }
        }
        for (int g = 0; g < 4; g++) memcpy(o[g] + c0, acc[g], sizeof acc[g]);
    }
    for (int g = 0; g < 4; g++)
        for (int64_t c = 0; c < D; c++) o[g][c] *= inv[g];
}
#define GROUP 4
#else
#define GROUP 1
#endif

static void attend_rows(void *ctx, int64_t i0, int64_t i1) {  /* rows i = h * R + r of every head h */
    struct attend_ctx *cx = ctx;
    const float *q = cx->q, *k = cx->k, *v = cx->v, scale = cx->scale;
    const int64_t R = cx->R, T = cx->T, D = cx->D, hs = cx->hs, W = cx->W, keys = cx->keys;
    const int64_t padded = (keys + LANES - 1) / LANES * LANES;
    float *s = malloc(GROUP * padded * sizeof(float));
    if (!s) {
        __atomic_store_n(&cx->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (int64_t row = i0; row < i1;) {
        const int64_t h = row / R, r = row % R;
        const float *kh = k + h * hs, *vh = v + h * hs;
#if GROUP > 1
        /* 4 rows of this head in this range, head sizes whose value sums fit the registers 64 at a time */
        if (r + GROUP <= R && row + GROUP <= i1 && D % 64 == 0) {
            const float *qr[GROUP];
            const uint8_t *mr[GROUP];
            float *sg[GROUP], *og[GROUP], inv[GROUP];
            for (int g = 0; g < GROUP; g++) {
                qr[g] = q + (row + g) * D, mr[g] = cx->mask + ((r + g) % T) * W;
                sg[g] = s + g * padded, og[g] = cx->out + (row + g) * D;
            }
            group_scores(qr, mr, kh, keys, D, scale, sg);
            for (int g = 0; g < GROUP; g++) inv[g] = row_softmax(sg[g], keys, padded);
            group_values((const float *const *)sg, vh, keys, D, inv, og);
            row += GROUP;
            continue;
        }
#endif
        row_scores(q + row * D, cx->mask + (r % T) * W, kh, keys, D, scale, s);
        row_values(s, vh, keys, D, row_softmax(s, keys, padded), cx->out + row * D);
        row++;
    }
    free(s);
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
