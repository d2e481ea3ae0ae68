#include "common.h"

/* Matmuls y [M, N] = x [M, K] . W [N, K]^T on the CPU (see the module docstring):
     x16_gemm: int8 / int4 weights in the 16-row layout, x rounded to int8 per block of 32 columns;
     bf16_gemm: x and W bfloat16 (their bit patterns), sums in float32.
   Each output (m, n) is fed block after block in K order: the same operations whatever M is and
   whichever rows share a register tile, so a row's result never depends on the pass width. Output
   rows are split over threads, never a sum. K % 32 == 0, G a power of two >= 32. */

static inline float half_to_float(uint16_t h) {  /* IEEE fp16 -> float32, exact */
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t u;
    if (exp == 0x1F) u = sign | 0x7F800000 | (man << 13);
    else if (exp) u = sign | ((exp + 112) << 23) | (man << 13);
    else if (man) {  /* subnormal: normalize */
        int e = -1;
        uint32_t m = man;
        do { e++; m <<= 1; } while (!(m & 0x400));
        u = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3FF) << 13);
    } else u = sign;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- int8 / int4, narrow passes: x quantized per row in blocks of 32 (a int8, d its scale, as =
   sum(a)); W in blocks of 16 rows with, per 4 columns, the 16 rows' 4 bytes side by side (int8:
   [K/4][16][4] of u = w + 128, or q as stored with zero points; int4: [K/8][16][4], low nibble column
   8o + j, high 8o + 4 + j, u = q + 8, or q with zero points), scales and zero points [ng][16] fp16.
   One unsigned x signed VNNI dot product then serves 16 rows (lane r: row r), the 4 activation bytes
   broadcast: y[m, r] = sum_b S_rb d_b (sum u a - off sum a) for signed weights (off = 128, int8 / 8,
   int4, subtracted in integers), sum_b S_rb d_b (sum u a) + z_rb d_b sum a with zero points. */
struct quant_ctx { const float *x; int64_t K; int8_t *a; float *d; int32_t *as; };

static void quant_rows(void *ctx, int64_t m0, int64_t m1) {
    const struct quant_ctx *cx = ctx;
    const float *x = cx->x;
    const int64_t K = cx->K;
    int8_t *a = cx->a;
    float *d = cx->d;
    int32_t *as = cx->as;
    for (int64_t m = m0; m < m1; m++)
        for (int64_t b = 0; b < K / 32; b++) {
            const float *xr = x + m * K + 32 * b;
            int8_t *ar = a + m * K + 32 * b;
            int32_t sum = 0;
            /* a NaN in x makes d NaN, so the outputs are NaN too (the max would drop it) */
#if defined(__AVX512F__)
            const __m512 x0 = _mm512_loadu_ps(xr), x1 = _mm512_loadu_ps(xr + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
            const int nan = (_mm512_cmp_ps_mask(x0, x0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(x1, x1, _CMP_UNORD_Q)) != 0;
            const float id = amax > 0.0f && !nan ? 127.0f / amax : 0.0f;
            /* round to nearest even, as nearbyintf: |q| <= 127 */
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, _mm512_set1_ps(id)));
            const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, _mm512_set1_ps(id)));
            _mm_storeu_si128((__m128i *)ar, _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)(ar + 16), _mm512_cvtepi32_epi8(q1));
            sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#else
            float amax = 0.0f;
            int nan = 0;
            for (int i = 0; i < 32; i++) {
                amax = fmaxf(amax, fabsf(xr[i]));
                nan |= isnan(xr[i]);
            }
            const float id = amax > 0.0f && !nan ? 127.0f / amax : 0.0f;
            for (int i = 0; i < 32; i++) {
                ar[i] = (int8_t)(int32_t)nearbyintf(xr[i] * id);  /* |q| <= 127 */
                sum += ar[i];
            }
#endif
            d[m * (K / 32) + b] = nan ? NAN : amax / 127.0f;
            as[m * (K / 32) + b] = sum;
        }
}

static void quant_blocks(const float *x, int64_t M, int64_t K, int8_t *a, float *d, int32_t *as, int threads) {
    struct quant_ctx c = {x, K, a, d, as};
    run_ranges(M, 4, quant_rows, &c, threads);  /* a narrow pass's few rows on one thread */
}

static int log2_exact(int64_t g) {  /* group sizes are powers of two */
    int gs = 0;
    while (((int64_t)1 << gs) < g) gs++;
    return gs;
}

typedef int32_t i32u __attribute__((may_alias, aligned(1)));  /* 4 activation bytes, broadcast by the dot */

/* The weight's bytes PREFETCH_AHEAD past the block a tile reads now, asked for a cache line at a time.
   A tile of several pass rows spends ~60-250 instructions on each block of 32 columns, so the core's
   window holds too few blocks to keep memory busy, and the hardware prefetchers did not make up for it:
   from memory an 8-row tile ran at 40% of the rate it reaches on cached weights (a 16-row int4 pass of
   NLD-3B's up projection: 2.96 -> 1.5 ms, one Zen 5 core; `scripts/bench_cpu_matmul.py`). Weights under
   PREFETCH_MIN bytes stay in the caches from pass to pass (the demo model's): asking for them cost 4% of
   its int4 decode. Prefetching touches no result. */
#define PREFETCH_AHEAD 16384
#define PREFETCH_MIN (1 << 20)
#define PREFETCH_W(w, b, bits)                                                                    \
    for (int l = 0; l < (bits); l++) __builtin_prefetch((w) + ((b) * (bits) + l) * 64 + PREFETCH_AHEAD, 0, 3)

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define X16_SIMD 512
#define MT 8  /* pass rows per register tile */
/* MTC pass rows x 16 weight rows; per block of 32 columns two integer accumulators per pass row (4
   dot products each: half the dependency chain; integer sums, so the split changes nothing) */
#define B16(MTC)                                                                                  \
static void b16_##MTC(int bits, const int8_t *a, const float *d, const int32_t *as,                    \
                      int64_t K, int gs, const uint8_t *w, const uint16_t *s, const uint16_t *z, int off, \
                      float *y, int64_t N, int64_t rows, int pf) {                                \
    const int64_t nb32 = K / 32;                                                                  \
    const __m512i lo4 = _mm512_set1_epi8(0x0F);                                                   \
    __m512 tot[MTC];                                                                              \
    for (int i = 0; i < MTC; i++) tot[i] = _mm512_setzero_ps();                                   \
    for (int64_t b = 0; b < nb32; b++) {                                                          \
        if (pf) PREFETCH_W(w, b, bits);                                                           \
        __m512i wv[8];                                                                            \
        if (bits == 8)                                                                            \
            for (int q = 0; q < 8; q++) wv[q] = _mm512_loadu_si512(w + (b * 8 + q) * 64);        \
        else                                                                                      \
            for (int o = 0; o < 4; o++) {                                                         \
                const __m512i v = _mm512_loadu_si512(w + (b * 4 + o) * 64);                       \
                wv[2 * o] = _mm512_and_si512(v, lo4);                                             \
                wv[2 * o + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);                   \
            }                                                                                     \
        const int64_t g = (32 * b) >> gs;                                                         \
        const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + g * 16)));     \
        const __m512 zv = z ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(z + g * 16))) : sv; \
        for (int i = 0; i < MTC; i++) {                                                           \
            const i32u *a4 = (const i32u *)(a + i * K + 32 * b);                                  \
            const int64_t j = i * nb32 + b;                                                       \
            /* signed weights: sum u a - off sum a = sum q a, the offset taken out in integers */  \
            __m512i c0 = z ? _mm512_setzero_si512() : _mm512_set1_epi32(-off * as[j]);            \
            __m512i c1 = _mm512_setzero_si512();                                                  \
            for (int q = 0; q < 8; q += 2) {                                                      \
                c0 = _mm512_dpbusd_epi32(c0, wv[q], _mm512_set1_epi32(a4[q]));                    \
                c1 = _mm512_dpbusd_epi32(c1, wv[q + 1], _mm512_set1_epi32(a4[q + 1]));            \
            }                                                                                     \
            const __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(c0, c1));                        \
            tot[i] = _mm512_fmadd_ps(f, _mm512_mul_ps(sv, _mm512_set1_ps(d[j])), tot[i]);         \
            if (z) tot[i] = _mm512_fmadd_ps(zv, _mm512_set1_ps(d[j] * (float)as[j]), tot[i]);    \
        }                                                                                         \
    }                                                                                             \
    for (int i = 0; i < MTC; i++) {                                                               \
        float t[16];                                                                              \
        _mm512_storeu_ps(t, tot[i]);                                                              \
        memcpy(y + i * N, t, rows * sizeof(float));                                               \
    }                                                                                             \
}
B16(1) B16(2) B16(3) B16(4) B16(5) B16(6) B16(7) B16(8)
#define TILES {0, b16_1, b16_2, b16_3, b16_4, b16_5, b16_6, b16_7, b16_8}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
/* 256-bit (Intel laptops and desktops without AVX-512, AMD before Zen 4): the same sums, the 16 weight
   rows as two vectors of 8 (lane r of half h: row 8h + r). The unsigned x signed 4-byte dot is AVX-VNNI's
   (Alder Lake and later); without it, byte pairs summed in 16 bits, then in 32, exactly: an int4 byte u
   (<= 15) as it is (|pair| <= 2 * 15 * 127); an int8 byte as q = u - 128 (one xor), |q| times a with q's
   sign (|q| <= 128, |a| <= 127: |pair| <= 32512), the 128 sum(a) added back in integers. */
#define X16_SIMD 256
#define MT 4
#if defined(__AVXVNNI__)
#define DP_SMALL(acc, u, a) _mm256_dpbusd_avx_epi32(acc, u, a)
#define DP_BYTE(acc, u, a) _mm256_dpbusd_avx_epi32(acc, u, a)
#define BYTE_SHIFT 0   /* sum u a as it is */
#else
static inline __m256i dp_small(__m256i acc, __m256i u, __m256i a) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), _mm256_set1_epi16(1)));
}
static inline __m256i dp_byte(__m256i acc, __m256i u, __m256i a) {  /* sum (u - 128) a */
    const __m256i q = _mm256_xor_si256(u, _mm256_set1_epi8((char)0x80));
    return dp_small(acc, _mm256_abs_epi8(q), _mm256_sign_epi8(a, q));
}
#define DP_SMALL(acc, u, a) dp_small(acc, u, a)
#define DP_BYTE(acc, u, a) dp_byte(acc, u, a)
#define BYTE_SHIFT 128 /* sum u a = sum (u - 128) a + 128 sum a */
#endif
#define B16(MTC)                                                                                  \
static void b16_##MTC(int bits, const int8_t *a, const float *d, const int32_t *as,                    \
                      int64_t K, int gs, const uint8_t *w, const uint16_t *s, const uint16_t *z, int off, \
                      float *y, int64_t N, int64_t rows, int pf) {                                \
    const int64_t nb32 = K / 32;                                                                  \
    const __m256i lo4 = _mm256_set1_epi8(0x0F);                                                   \
    __m256 tot[MTC][2];                                                                           \
    for (int i = 0; i < MTC; i++) tot[i][0] = tot[i][1] = _mm256_setzero_ps();                    \
    for (int64_t b = 0; b < nb32; b++) {                                                          \
        if (pf) PREFETCH_W(w, b, bits);                                                           \
        const int64_t g = (32 * b) >> gs;                                                         \
        for (int h = 0; h < 2; h++) {                                                             \
            __m256i wv[8];                                                                        \
            if (bits == 8)                                                                        \
                for (int q = 0; q < 8; q++)                                                       \
                    wv[q] = _mm256_loadu_si256((const __m256i *)(w + (b * 8 + q) * 64 + 32 * h)); \
            else                                                                                  \
                for (int o = 0; o < 4; o++) {                                                     \
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(w + (b * 4 + o) * 64 + 32 * h)); \
                    wv[2 * o] = _mm256_and_si256(v, lo4);                                         \
                    wv[2 * o + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);               \
                }                                                                                 \
            const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + g * 16 + 8 * h))); \
            const __m256 zv = z ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(z + g * 16 + 8 * h))) : sv; \
            for (int i = 0; i < MTC; i++) {                                                       \
                const i32u *a4 = (const i32u *)(a + i * K + 32 * b);                              \
                const int64_t j = i * nb32 + b;                                                   \
                const int32_t base = (z ? 0 : -off * as[j]) + (bits == 8 ? BYTE_SHIFT * as[j] : 0); \
                __m256i c0 = _mm256_set1_epi32(base), c1 = _mm256_setzero_si256();                \
                if (bits == 8)                                                                    \
                    for (int q = 0; q < 8; q += 2) {                                              \
                        c0 = DP_BYTE(c0, wv[q], _mm256_set1_epi32(a4[q]));                        \
                        c1 = DP_BYTE(c1, wv[q + 1], _mm256_set1_epi32(a4[q + 1]));                \
                    }                                                                             \
                else                                                                              \
                    for (int q = 0; q < 8; q += 2) {                                              \
                        c0 = DP_SMALL(c0, wv[q], _mm256_set1_epi32(a4[q]));                       \
                        c1 = DP_SMALL(c1, wv[q + 1], _mm256_set1_epi32(a4[q + 1]));               \
                    }                                                                             \
                const __m256 f = _mm256_cvtepi32_ps(_mm256_add_epi32(c0, c1));                    \
                tot[i][h] = _mm256_fmadd_ps(f, _mm256_mul_ps(sv, _mm256_set1_ps(d[j])), tot[i][h]); \
                if (z) tot[i][h] = _mm256_fmadd_ps(zv, _mm256_set1_ps(d[j] * (float)as[j]), tot[i][h]); \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    for (int i = 0; i < MTC; i++) {                                                               \
        float t[16];                                                                              \
        _mm256_storeu_ps(t, tot[i][0]);                                                           \
        _mm256_storeu_ps(t + 8, tot[i][1]);                                                       \
        memcpy(y + i * N, t, rows * sizeof(float));                                               \
    }                                                                                             \
}
B16(1) B16(2) B16(3) B16(4)
#define TILES {0, b16_1, b16_2, b16_3, b16_4}

#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
/* ARM with the dot product (ARMv8.2+: Apple M-series, Snapdragon X, Graviton 2+): the 16 weight rows as
   four vectors of 4 rows, `sdot` summing 4 byte products into each row's lane. sdot is signed x signed:
   an int4 byte u (<= 15) as it is; an int8 byte as q = u - 128 (one xor), 128 sum(a) added back in
   integers where u is what counts (zero points). The same integer sums as every other build, scaled in
   the same float operations, so each output is the others' bit for bit. One tile for both ARM paths:
   `weights` lays a block's bytes out for the instruction, `sums` makes GROUP x rows' integer sums for
   4 weight rows, `scaled` adds one x row's into its totals. */
#define X16_SIMD 128
#define MT 4
#if defined(__ARM_FEATURE_MATMUL_INT8)
/* With the int8 matrix multiply (i8mm, ARMv8.6: Apple M2+, Graviton 3+, Snapdragon X): `smmla` multiplies
   2 x 8 activation bytes (two x rows, 8 columns) by 8 x 2 weight bytes (two weight rows), a 2 x 2 block
   of sums per instruction where `sdot` gives 4 one-row sums. A weight row's 8 columns come from two
   4-column groups of the layout (int8: groups 2q and 2q + 1 zipped by 32 bits; int4: a group's low and
   high nibbles zipped); the 2 x 2 blocks are unzipped back to one x row's 4 weight rows by 64 bits.
   A pass of odd width multiplies its last row with zeros. */
#define GROUP 2
typedef struct { int8x16_t v[4]; } acts_t;  /* x rows i, i + 1: columns 8q .. 8q + 7 of block b */

static inline acts_t acts(const int8_t *a, int64_t K, int64_t b, int64_t rows) {
    acts_t t;
    for (int q = 0; q < 4; q++)
        t.v[q] = vcombine_s8(vld1_s8(a + 32 * b + 8 * q), rows > 1 ? vld1_s8(a + K + 32 * b + 8 * q) : vdup_n_s8(0));
    return t;
}

/* columns 8q .. 8q + 7 of rows 4h .. 4h + 3: wv[2q] rows 4h, 4h + 1, wv[2q + 1] rows 4h + 2, 4h + 3 */
static inline void weights(int bits, const uint8_t *w, int64_t b, int h, int8x16_t wv[8]) {
    for (int q = 0; q < 4; q++) {
        int32x4_t lo, hi;
        if (bits == 8) {
            lo = vreinterpretq_s32_u8(veorq_u8(vld1q_u8(w + (b * 8 + 2 * q) * 64 + 16 * h), vdupq_n_u8(0x80)));
            hi = vreinterpretq_s32_u8(veorq_u8(vld1q_u8(w + (b * 8 + 2 * q + 1) * 64 + 16 * h), vdupq_n_u8(0x80)));
        } else {
            const uint8x16_t v = vld1q_u8(w + (b * 4 + q) * 64 + 16 * h);
            lo = vreinterpretq_s32_u8(vandq_u8(v, vdupq_n_u8(0x0F)));
            hi = vreinterpretq_s32_u8(vshrq_n_u8(v, 4));
        }
        wv[2 * q] = vreinterpretq_s8_s32(vzip1q_s32(lo, hi));
        wv[2 * q + 1] = vreinterpretq_s8_s32(vzip2q_s32(lo, hi));
    }
}

static inline void sums(acts_t x, const int8x16_t wv[8], int32x4_t c[GROUP]) {
    int32x4_t r01 = vdupq_n_s32(0), r23 = vdupq_n_s32(0);
    for (int q = 0; q < 4; q++) {
        r01 = vmmlaq_s32(r01, x.v[q], wv[2 * q]);
        r23 = vmmlaq_s32(r23, x.v[q], wv[2 * q + 1]);
    }
    /* lanes (x row, weight row): r01 (i, 4h) (i, 4h+1) (i+1, 4h) (i+1, 4h+1), r23 likewise */
    const int64x2_t e01 = vreinterpretq_s64_s32(r01), e23 = vreinterpretq_s64_s32(r23);
    c[0] = vreinterpretq_s32_s64(vzip1q_s64(e01, e23));
    c[1] = vreinterpretq_s32_s64(vzip2q_s64(e01, e23));
}
#else
#define GROUP 1
typedef struct { const i32u *a4; } acts_t;  /* x row i's 4-byte groups of block b, broadcast by `sdot` */

static inline acts_t acts(const int8_t *a, int64_t K, int64_t b, int64_t rows) {
    (void)K, (void)rows;
    return (acts_t){(const i32u *)(a + 32 * b)};
}

/* columns 4q .. 4q + 3 of rows 4h .. 4h + 3 */
static inline void weights(int bits, const uint8_t *w, int64_t b, int h, int8x16_t wv[8]) {
    if (bits == 8)
        for (int q = 0; q < 8; q++)
            wv[q] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(w + (b * 8 + q) * 64 + 16 * h), vdupq_n_u8(0x80)));
    else
        for (int o = 0; o < 4; o++) {
            const uint8x16_t v = vld1q_u8(w + (b * 4 + o) * 64 + 16 * h);
            wv[2 * o] = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F)));
            wv[2 * o + 1] = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
        }
}

static inline void sums(acts_t x, const int8x16_t wv[8], int32x4_t c[GROUP]) {
    int32x4_t c0 = vdupq_n_s32(0), c1 = vdupq_n_s32(0);
    for (int q = 0; q < 8; q += 2) {
        c0 = vdotq_s32(c0, wv[q], vreinterpretq_s8_s32(vdupq_n_s32(x.a4[q])));
        c1 = vdotq_s32(c1, wv[q + 1], vreinterpretq_s8_s32(vdupq_n_s32(x.a4[q + 1])));
    }
    c[0] = vaddq_s32(c0, c1);
}
#endif

/* x row j's integer sums c for 4 weight rows, scaled into its totals (the same float operations in
   every build): S d (sum u a - off sum a), or S d (sum u a) + z d sum a with zero points */
static inline float32x4_t scaled(float32x4_t tot, int32x4_t c, int bits, int off, const float *d,
                                 const int32_t *as, int64_t j, float32x4_t sv, float32x4_t zv, int zp) {
    const int32_t base = bits == 8 ? (zp ? 128 * as[j] : 0) : (zp ? 0 : -off * as[j]);
    tot = vfmaq_f32(tot, vcvtq_f32_s32(vaddq_s32(c, vdupq_n_s32(base))), vmulq_n_f32(sv, d[j]));
    return zp ? vfmaq_f32(tot, zv, vdupq_n_f32(d[j] * (float)as[j])) : tot;
}

#define B16(MTC)                                                                                  \
static void b16_##MTC(int bits, const int8_t *a, const float *d, const int32_t *as,                    \
                      int64_t K, int gs, const uint8_t *w, const uint16_t *s, const uint16_t *z, int off, \
                      float *y, int64_t N, int64_t rows, int pf) {                                \
    const int64_t nb32 = K / 32;                                                                  \
    float32x4_t tot[MTC][4];                                                                      \
    for (int i = 0; i < MTC; i++)                                                                 \
        for (int h = 0; h < 4; h++) tot[i][h] = vdupq_n_f32(0.0f);                                \
    for (int64_t b = 0; b < nb32; b++) {                                                          \
        if (pf) PREFETCH_W(w, b, bits);                                                           \
        const int64_t g = (32 * b) >> gs;                                                         \
        acts_t x[(MTC + GROUP - 1) / GROUP];                                                      \
        for (int p = 0; p * GROUP < MTC; p++) x[p] = acts(a + p * GROUP * K, K, b, MTC - p * GROUP); \
        for (int h = 0; h < 4; h++) {                                                             \
            int8x16_t wv[8];                                                                      \
            weights(bits, w, b, h, wv);                                                           \
            const float32x4_t sv = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s + g * 16 + 4 * h))); \
            const float32x4_t zv = z ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(z + g * 16 + 4 * h))) : sv; \
            for (int p = 0; p * GROUP < MTC; p++) {                                               \
                int32x4_t c[GROUP];                                                               \
                sums(x[p], wv, c);                                                                \
                for (int e = 0; e < GROUP && p * GROUP + e < MTC; e++) {                          \
                    const int i = p * GROUP + e;                                                  \
                    tot[i][h] = scaled(tot[i][h], c[e], bits, off, d, as, i * nb32 + b, sv, zv, z != 0); \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    for (int i = 0; i < MTC; i++) {                                                               \
        float t[16];                                                                              \
        for (int h = 0; h < 4; h++) vst1q_f32(t + 4 * h, tot[i][h]);                              \
        memcpy(y + i * N, t, rows * sizeof(float));                                               \
    }                                                                                             \
}
B16(1) B16(2) B16(3) B16(4)
#define TILES {0, b16_1, b16_2, b16_3, b16_4}

#else
#define X16_SIMD 0
#define MT 8
#endif

int x16_simd(void) { return X16_SIMD; }  /* which path this build took: 512, 256, 128 (NEON) or 0 (portable C) */

static void block16(int bits, const int8_t *a, const float *d, const int32_t *as, int64_t M,
                    int64_t K, int gs, const uint8_t *w, const uint16_t *s, const uint16_t *z, int off, float *y,
                    int64_t N, int64_t rows, int pf) {
    const int64_t nb32 = K / 32;
    for (int64_t m0 = 0; m0 < M; m0 += MT) {
        const int64_t mt = M - m0 < MT ? M - m0 : MT;
#if X16_SIMD
        typedef void (*tile)(int, const int8_t *, const float *, const int32_t *, int64_t, int,
                             const uint8_t *, const uint16_t *, const uint16_t *, int, float *, int64_t, int64_t, int);
        static const tile tiles[MT + 1] = TILES;
        tiles[mt](bits, a + m0 * K, d + m0 * nb32, as + m0 * nb32, K, gs, w, s, z, off,
                  y + m0 * N, N, rows, pf);
#else   /* portable: the same sums, lane by lane */
        for (int64_t i = 0; i < mt; i++)
            for (int64_t r = 0; r < rows; r++) {
                float tot = 0.0f;
                for (int64_t b = 0; b < nb32; b++) {
                    const int64_t g = (32 * b) >> gs, j = (m0 + i) * nb32 + b;
                    int32_t acc = z ? 0 : -off * as[j];
                    for (int k = 0; k < 32; k++) {
                        const int64_t q = 32 * b + k;
                        int u;
                        if (bits == 8) u = w[(q / 4) * 64 + r * 4 + q % 4];
                        else {
                            const uint8_t byte = w[(q / 8) * 64 + r * 4 + q % 4];
                            u = q % 8 < 4 ? byte & 15 : byte >> 4;
                        }
                        acc += u * a[(m0 + i) * K + q];
                    }
                    tot = fmaf((float)acc, half_to_float(s[g * 16 + r]) * d[j], tot);
                    if (z) tot = fmaf(half_to_float(z[g * 16 + r]), d[j] * (float)as[j], tot);
                }
                y[(m0 + i) * N + r] = tot;
            }
#endif
    }
}

struct x16_ctx {
    int bits;
    const int8_t *a;
    const float *d;
    const int32_t *as;
    int64_t M, K;
    int gs;
    int64_t ng, wb;
    const uint8_t *w;
    const uint16_t *s, *z;
    int off;
    float *y;
    int64_t N;
    int pf;
};

static void x16_blocks(void *ctx, int64_t r0, int64_t r1) {  /* the weight's 16-row blocks r0 .. r1 - 1 */
    const struct x16_ctx *cx = ctx;
    for (int64_t r = r0; r < r1; r++)
        block16(cx->bits, cx->a, cx->d, cx->as, cx->M, cx->K, cx->gs, cx->w + r * cx->wb, cx->s + r * cx->ng * 16,
                cx->z ? cx->z + r * cx->ng * 16 : 0, cx->off, cx->y + 16 * r, cx->N, cx->N - 16 * r < 16 ? cx->N - 16 * r : 16,
                cx->pf);
}

/* Returns 0, or -1 where memory for the rounded activations could not be had (y untouched). */
int x16_gemm(int bits, const float *x, int64_t M, int64_t K, const uint8_t *w, const uint16_t *s, const uint16_t *z,
             int64_t N, int64_t G, float *y, int threads) {
    const int gs = log2_exact(G);
    const int64_t ng = K >> gs, nb = (N + 15) / 16, wb = 16 * K * bits / 8;
    int8_t *a = malloc(M * K);
    float *d = malloc(M * (K / 32) * sizeof(float));
    int32_t *as = malloc(M * (K / 32) * sizeof(int32_t));
    if (!a || !d || !as) {
        free(a); free(d); free(as);
        return -1;
    }
    quant_blocks(x, M, K, a, d, as, threads);
    struct x16_ctx c = {bits, a, d, as, M, K, gs, ng, wb, w, s, z, bits == 8 ? 128 : 8, y, N, nb * wb >= PREFETCH_MIN};
    run_ranges(nb, 1, x16_blocks, &c, threads);
    free(a); free(d); free(as);
    return 0;
}

/* ---- the weight between its stored layout and the 16-row one (both ways, exact). Stored: int8 [N, K]
   (q, or u with zero points), int4 [N, K / 2] (column c in the low nibble of byte c / 2 when c is even).
   Layout: [N / 16 (rounded up)][K / 4 (int4: K / 8)][16][4] unsigned bytes (see x16_gemm), the rows past
   N zero. A signed value moves to unsigned with its top bit flipped (q + 128 = q ^ 0x80; a nibble's
   q + 8 = n ^ 8), and back the same way. */
struct pack_ctx { int bits; uint8_t flip; const uint8_t *from; int64_t N, K; uint8_t *to; };

static void pack_blocks(void *ctx, int64_t b0, int64_t b1) {
    const struct pack_ctx *cx = ctx;
    const int bits = cx->bits;
    const uint8_t flip = cx->flip, *q = cx->from;
    const int64_t N = cx->N, per = bits == 8 ? cx->K / 4 : cx->K / 8, row = cx->K * bits / 8;
    uint8_t *w = cx->to;
    for (int64_t b = b0; b < b1; b++)
        for (int64_t o = 0; o < per; o++)
            for (int r = 0; r < 16; r++) {
                uint8_t *dst = w + ((b * per + o) * 16 + r) * 4;
                const int64_t n = 16 * b + r;
                if (n >= N) { memset(dst, 0, 4); continue; }
                const uint8_t *src = q + n * row;
                if (bits == 8)
                    for (int j = 0; j < 4; j++) dst[j] = src[4 * o + j] ^ flip;
                else  /* columns 8o .. 8o + 7: bytes 4o .. 4o + 3 of the row, two columns each */
                    for (int j = 0; j < 4; j++) {
                        const uint8_t lo = src[4 * o + j / 2], hi = src[4 * o + 2 + j / 2];
                        const uint8_t a = (j & 1 ? lo >> 4 : lo & 15), c = (j & 1 ? hi >> 4 : hi & 15);
                        dst[j] = (uint8_t)(a | c << 4) ^ flip;
                    }
            }
}

static uint8_t flip_of(int bits, int signed_w) { return signed_w ? (bits == 8 ? 0x80 : 0x88) : 0; }

void x16_pack(int bits, int signed_w, const uint8_t *q, int64_t N, int64_t K, uint8_t *w, int threads) {
    struct pack_ctx c = {bits, flip_of(bits, signed_w), q, N, K, w};
    run_ranges((N + 15) / 16, 1, pack_blocks, &c, threads);
}

static void unpack_rows(void *ctx, int64_t n0, int64_t n1) {
    const struct pack_ctx *cx = ctx;
    const int bits = cx->bits;
    const uint8_t flip = cx->flip, *w = cx->from;
    const int64_t per = bits == 8 ? cx->K / 4 : cx->K / 8, row = cx->K * bits / 8;
    uint8_t *q = cx->to;
    for (int64_t n = n0; n < n1; n++) {
        const int64_t b = n / 16, r = n % 16;
        uint8_t *dst = q + n * row;
        for (int64_t o = 0; o < per; o++) {
            const uint8_t *src = w + ((b * per + o) * 16 + r) * 4;
            if (bits == 8)
                for (int j = 0; j < 4; j++) dst[4 * o + j] = src[j] ^ flip;
            else  /* byte j: column 8o + j low, 8o + 4 + j high */
                for (int j = 0; j < 4; j += 2) {
                    const uint8_t x = src[j] ^ flip, y = src[j + 1] ^ flip;
                    dst[4 * o + j / 2] = (uint8_t)((x & 15) | (y & 15) << 4);
                    dst[4 * o + 2 + j / 2] = (uint8_t)((x >> 4) | (y >> 4) << 4);
                }
        }
    }
}

void x16_unpack(int bits, int signed_w, const uint8_t *w, int64_t N, int64_t K, uint8_t *q, int threads) {
    struct pack_ctx c = {bits, flip_of(bits, signed_w), w, N, K, q};
    run_ranges(N, 16, unpack_rows, &c, threads);
}
