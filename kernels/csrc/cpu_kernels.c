#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include <pthread.h>

#include "cpu_kernels.h"
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  /* x86's SIMD paths */
#elif defined(__aarch64__)
#include <arm_neon.h>   /* ARM's (NEON is part of every ARMv8-A); every other CPU builds the portable loops */
#endif

/* Matmuls y [M, N] = x [M, K] . W [N, K]^T on the CPU (see the module docstring):
     x16_gemm: int8 / int4 weights in the 16-row layout, x rounded to int8 per block of 32 columns;
     bf16_gemm: x and W bfloat16 (their bit patterns), sums in float32.
   Each output (m, n) is fed block after block in K order: the same operations whatever M is and
   whichever rows share a register tile, so a row's result never depends on the pass width. Output
   rows are split over threads, never a sum. K % 32 == 0, G a power of two >= 32. */

/* ---- threads: every kernel splits its output into independent ranges and runs them through
   `run_ranges`: the function `edge_set_parallel` installed (the torch operators install ATen's
   parallel_for: torch's own threads, as many as torch.get_num_threads()), else up to `threads` POSIX threads
   for the call (the ctypes path of an install without the operators). No OpenMP: the same ranges either way. */
static edge_parallel_fn parallel_fn;

void edge_set_parallel(edge_parallel_fn fn) { parallel_fn = fn; }

#define MAX_THREADS 256
struct piece { edge_range_fn fn; void *ctx; int64_t begin, end; };

static void *run_piece(void *arg) {
    const struct piece *p = arg;
    p->fn(p->ctx, p->begin, p->end);
    return 0;
}

/* fn(ctx, begin, end) over [0, n) in at most `threads` ranges, each at least `grain` long */
static void run_ranges(int64_t n, int64_t grain, edge_range_fn fn, void *ctx, int threads) {
    if (n <= 0) return;
    if (parallel_fn) {
        parallel_fn(n, grain, fn, ctx);
        return;
    }
    int64_t t = (n + grain - 1) / grain;
    t = t < threads ? t : threads;
    t = t < MAX_THREADS ? t : MAX_THREADS;
    if (t <= 1) {
        fn(ctx, 0, n);
        return;
    }
    const int64_t chunk = (n + t - 1) / t;
    struct piece pieces[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t i = 1; i < t; i++) {
        pieces[i] = (struct piece){fn, ctx, i * chunk, (i + 1) * chunk < n ? (i + 1) * chunk : n};
        if (pieces[i].begin >= pieces[i].end) continue;
        started[i] = pthread_create(&ids[i], 0, run_piece, &pieces[i]) == 0;
        if (!started[i]) fn(ctx, pieces[i].begin, pieces[i].end);  /* no thread to be had: here */
    }
    fn(ctx, 0, chunk < n ? chunk : n);
    for (int64_t i = 1; i < t; i++)
        if (started[i]) pthread_join(ids[i], 0);
}

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
   the same float operations, so each output is the others' bit for bit. */
#define X16_SIMD 128
#define MT 4
#if defined(__ARM_FEATURE_MATMUL_INT8)
/* With the int8 matrix multiply (i8mm, ARMv8.6: Apple M2+, Graviton 3+, Snapdragon X): `smmla` multiplies
   2 x 8 activation bytes (two x rows, 8 columns) by 8 x 2 weight bytes (two weight rows), a 2 x 2 block
   of sums per instruction where `sdot` gives 4 one-row sums. A weight row's 8 columns come from two
   4-column groups of the layout (int8: groups 2q and 2q + 1 zipped by 32 bits; int4: a group's low and
   high nibbles zipped); the 2 x 2 blocks are unzipped back to one x row's 4 weight rows by 64 bits, and
   the rest is the `sdot` path's arithmetic: the same integer sums, scaled in the same float operations.
   A pass of odd width multiplies its last row with zeros. */
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
        int8x16_t av[(MTC + 1) / 2][4];  /* x rows 2p and 2p + 1, columns 8q .. 8q + 7 */           \
        for (int p = 0; p < (MTC + 1) / 2; p++)                                                   \
            for (int q = 0; q < 4; q++)                                                           \
                av[p][q] = vcombine_s8(vld1_s8(a + 2 * p * K + 32 * b + 8 * q),                   \
                                       2 * p + 1 < MTC ? vld1_s8(a + (2 * p + 1) * K + 32 * b + 8 * q) : vdup_n_s8(0)); \
        for (int h = 0; h < 4; h++) {                                                             \
            int8x16_t wv[8];  /* columns 8q .. 8q + 7: wv[2q] of rows 4h, 4h + 1, wv[2q + 1] of 4h + 2, 4h + 3 */ \
            for (int q = 0; q < 4; q++) {                                                         \
                int32x4_t lo, hi;                                                                 \
                if (bits == 8) {                                                                  \
                    lo = vreinterpretq_s32_u8(veorq_u8(vld1q_u8(w + (b * 8 + 2 * q) * 64 + 16 * h), vdupq_n_u8(0x80))); \
                    hi = vreinterpretq_s32_u8(veorq_u8(vld1q_u8(w + (b * 8 + 2 * q + 1) * 64 + 16 * h), vdupq_n_u8(0x80))); \
                } else {                                                                          \
                    const uint8x16_t v = vld1q_u8(w + (b * 4 + q) * 64 + 16 * h);                 \
                    lo = vreinterpretq_s32_u8(vandq_u8(v, vdupq_n_u8(0x0F)));                     \
                    hi = vreinterpretq_s32_u8(vshrq_n_u8(v, 4));                                  \
                }                                                                                 \
                wv[2 * q] = vreinterpretq_s8_s32(vzip1q_s32(lo, hi));                             \
                wv[2 * q + 1] = vreinterpretq_s8_s32(vzip2q_s32(lo, hi));                         \
            }                                                                                     \
            const float32x4_t sv = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s + g * 16 + 4 * h))); \
            const float32x4_t zv = z ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(z + g * 16 + 4 * h))) : sv; \
            for (int p = 0; p < (MTC + 1) / 2; p++) {                                             \
                int32x4_t r01 = vdupq_n_s32(0), r23 = vdupq_n_s32(0);                             \
                for (int q = 0; q < 4; q++) {                                                     \
                    r01 = vmmlaq_s32(r01, av[p][q], wv[2 * q]);                                   \
                    r23 = vmmlaq_s32(r23, av[p][q], wv[2 * q + 1]);                               \
                }                                                                                 \
                /* lanes (x row, weight row): r01 (2p, 4h) (2p, 4h+1) (2p+1, 4h) (2p+1, 4h+1), r23 likewise */ \
                const int64x2_t e01 = vreinterpretq_s64_s32(r01), e23 = vreinterpretq_s64_s32(r23);  \
                for (int e = 0; e < 2 && 2 * p + e < MTC; e++) {                                  \
                    const int i = 2 * p + e;                                                      \
                    const int64_t j = i * nb32 + b;                                               \
                    const int32_t base = bits == 8 ? (z ? 128 * as[j] : 0) : (z ? 0 : -off * as[j]); \
                    const int32x4_t c = vreinterpretq_s32_s64(e ? vzip2q_s64(e01, e23) : vzip1q_s64(e01, e23)); \
                    const float32x4_t f = vcvtq_f32_s32(vaddq_s32(c, vdupq_n_s32(base)));         \
                    tot[i][h] = vfmaq_f32(tot[i][h], f, vmulq_n_f32(sv, d[j]));                   \
                    if (z) tot[i][h] = vfmaq_f32(tot[i][h], zv, vdupq_n_f32(d[j] * (float)as[j])); \
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
#else
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
        for (int h = 0; h < 4; h++) {                                                             \
            int8x16_t wv[8];                                                                      \
            if (bits == 8)                                                                        \
                for (int q = 0; q < 8; q++)                                                       \
                    wv[q] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(w + (b * 8 + q) * 64 + 16 * h), vdupq_n_u8(0x80))); \
            else                                                                                  \
                for (int o = 0; o < 4; o++) {                                                     \
                    const uint8x16_t v = vld1q_u8(w + (b * 4 + o) * 64 + 16 * h);                 \
                    wv[2 * o] = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F)));              \
                    wv[2 * o + 1] = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));                        \
                }                                                                                 \
            const float32x4_t sv = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s + g * 16 + 4 * h))); \
            const float32x4_t zv = z ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(z + g * 16 + 4 * h))) : sv; \
            for (int i = 0; i < MTC; i++) {                                                       \
                const i32u *a4 = (const i32u *)(a + i * K + 32 * b);                              \
                const int64_t j = i * nb32 + b;                                                   \
                const int32_t base = bits == 8 ? (z ? 128 * as[j] : 0) : (z ? 0 : -off * as[j]);  \
                int32x4_t c0 = vdupq_n_s32(base), c1 = vdupq_n_s32(0);                            \
                for (int q = 0; q < 8; q += 2) {                                                  \
                    c0 = vdotq_s32(c0, wv[q], vreinterpretq_s8_s32(vdupq_n_s32(a4[q])));          \
                    c1 = vdotq_s32(c1, wv[q + 1], vreinterpretq_s8_s32(vdupq_n_s32(a4[q + 1])));  \
                }                                                                                 \
                const float32x4_t f = vcvtq_f32_s32(vaddq_s32(c0, c1));                           \
                tot[i][h] = vfmaq_f32(tot[i][h], f, vmulq_n_f32(sv, d[j]));                        \
                if (z) tot[i][h] = vfmaq_f32(tot[i][h], zv, vdupq_n_f32(d[j] * (float)as[j]));   \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    for (int i = 0; i < MTC; i++) {                                                               \
        float t[16];                                                                              \
        for (int h = 0; h < 4; h++) vst1q_f32(t + 4 * h, tot[i][h]);                              \
        memcpy(y + i * N, t, rows * sizeof(float));                                               \
    }                                                                                             \
}
#endif
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

/* ---- bf16 */
#define TILE16(MR, NR) TILE16_(MR, NR)  /* expands NB_NARROW / NB_WIDE before pasting the name */
#define TN_(MR, NR) t16_##MR##_##NR
#define TN(MR, NR) TN_(MR, NR)
#if defined(__AVX512F__)
#define BF16_SIMD 512
#define NB_NARROW 12  /* 1-2 row passes: 12 weight streams read memory faster than 8 (a 1-row pass at 3072 x 9216:
                         2.56 -> 2.23 ms, 22 -> 25 GB/s, Zen 5, a sequential read 24-29; 16 no faster) */
#define NB_WIDE 6   /* 4 x 6 accumulators + 6 weight vectors + 1 input vector = 31 of 32 registers */
#define ACC_LANES 16
#if defined(__AVX512BF16__)
#define TILE16_(MR, NR)                                                                           \
static void t16_##MR##_##NR(const uint16_t *x, int64_t K, const uint16_t *w, float *y, int64_t N,   \
                            int64_t c0, int64_t c1, float *part) {                        \
    __m512 acc[MR][NR];                                                                           \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++)                                    \
        acc[i][j] = c0 ? _mm512_loadu_ps(part + 16 * (i * NR + j)) : _mm512_setzero_ps();   \
    for (int64_t c = c0; c < c1; c += 32) {                                                       \
        if (NR == NB_WIDE) for (int j = 0; j < NR; j++) __builtin_prefetch(w + (j + NR) * K + c, 0, 3); \
        __m512bh wv[NR];                                                                          \
        for (int j = 0; j < NR; j++) wv[j] = (__m512bh)_mm512_loadu_si512(w + j * K + c);         \
        for (int i = 0; i < MR; i++) {                                                            \
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * K + c);                            \
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);     \
        }                                                                                         \
    }                                                                                             \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++)                                    \
        if (c1 < K) _mm512_storeu_ps(part + 16 * (i * NR + j), acc[i][j]);                    \
        else y[i * N + j] = _mm512_reduce_add_ps(acc[i][j]);                                 \
}
#else  /* no AVX512-BF16: widen both to float32 (a 16-bit shift) and fused multiply-add */
static inline __m512 widen(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#define TILE16_(MR, NR)                                                                           \
static void t16_##MR##_##NR(const uint16_t *x, int64_t K, const uint16_t *w, float *y, int64_t N,   \
                            int64_t c0, int64_t c1, float *part) {                        \
    __m512 acc[MR][NR];                                                                           \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++)                                    \
        acc[i][j] = c0 ? _mm512_loadu_ps(part + 16 * (i * NR + j)) : _mm512_setzero_ps();   \
    for (int64_t c = c0; c < c1; c += 16) {                                                       \
        if (NR == NB_WIDE) for (int j = 0; j < NR; j++) __builtin_prefetch(w + (j + NR) * K + c, 0, 3); \
        __m512 wv[NR];                                                                            \
        for (int j = 0; j < NR; j++) wv[j] = widen(w + j * K + c);                                \
        for (int i = 0; i < MR; i++) {                                                            \
            __m512 xv = widen(x + i * K + c);                                                     \
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);       \
        }                                                                                         \
    }                                                                                             \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++)                                    \
        if (c1 < K) _mm512_storeu_ps(part + 16 * (i * NR + j), acc[i][j]);                    \
        else y[i * N + j] = _mm512_reduce_add_ps(acc[i][j]);                                 \
}
#endif
#elif defined(__AVX2__) && defined(__FMA__)
/* 256-bit: bf16 widened to float32 (a 16-bit shift or a mask), fused multiply-add, 8 lanes per accumulator */
#define BF16_SIMD 256
#define NB_NARROW 8 /* spills at 2 rows, but 8 weight streams read memory faster than 4 (24 vs 18 GB/s, Zen 5) */
#define NB_WIDE 3   /* 4 x 3 accumulators + 3 weight vectors + 1 input vector = 16 registers */
#define ACC_LANES 8
static inline float hsum8(__m256 v) {  /* a fixed order: the two halves, then pairs */
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
/* 16 bf16 values as two float32 vectors without a shuffle: the even ones shifted up, the odd ones masked */
#define EVEN(v) _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
#define ODD(v) _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)))
#define TILE16_(MR, NR)                                                                           \
static void t16_##MR##_##NR(const uint16_t *x, int64_t K, const uint16_t *w, float *y, int64_t N,   \
                            int64_t c0, int64_t c1, float *part) {                        \
    __m256 acc[MR][NR];                                                                           \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++)                                    \
        acc[i][j] = c0 ? _mm256_loadu_ps(part + 8 * (i * NR + j)) : _mm256_setzero_ps();    \
    for (int64_t c = c0; c < c1; c += 16) {                                                       \
        if (NR == NB_WIDE) for (int j = 0; j < NR; j++) __builtin_prefetch(w + (j + NR) * K + c, 0, 3); \
        __m256i wv[NR];                                                                           \
        for (int j = 0; j < NR; j++) wv[j] = _mm256_loadu_si256((const __m256i *)(w + j * K + c)); \
        for (int i = 0; i < MR; i++) {                                                            \
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + i * K + c));              \
            const __m256 xe = EVEN(xv), xo = ODD(xv);                                             \
            for (int j = 0; j < NR; j++)                                                          \
                acc[i][j] = _mm256_fmadd_ps(xo, ODD(wv[j]), _mm256_fmadd_ps(xe, EVEN(wv[j]), acc[i][j])); \
        }                                                                                         \
    }                                                                                             \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++)                                    \
        if (c1 < K) _mm256_storeu_ps(part + 8 * (i * NR + j), acc[i][j]);                     \
        else y[i * N + j] = hsum8(acc[i][j]);                                                 \
}
#elif defined(__aarch64__)
/* ARM, 128-bit NEON: 8 bf16 values a step, 4 float32 lanes per accumulator. With the bf16 extension
   (ARMv8.6: Apple M2+, Graviton 3+) `bfdot` sums each lane's pair of products; without it both are
   widened to float32 (a 16-bit shift) and multiplied-added, the even and odd halves in turn. */
#define BF16_SIMD 128
#define NB_NARROW 8
#define NB_WIDE 4   /* 4 x 4 accumulators + 8 widened weight vectors + 2 input vectors = 26 of 32 registers */
#define ACC_LANES 4
#if defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
#define BF16_STEP(acc, xv, wv) vbfdotq_f32(acc, vreinterpretq_bf16_u16(xv), vreinterpretq_bf16_u16(wv))
#else
#define BF16_STEP(acc, xv, wv)                                                                    \
    vfmaq_f32(vfmaq_f32(acc, vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(xv), 16)),            \
                        vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(wv), 16))),                \
              vreinterpretq_f32_u32(vshll_high_n_u16(xv, 16)), vreinterpretq_f32_u32(vshll_high_n_u16(wv, 16)))
#endif
#define TILE16_(MR, NR)                                                                           \
static void t16_##MR##_##NR(const uint16_t *x, int64_t K, const uint16_t *w, float *y, int64_t N,   \
                            int64_t c0, int64_t c1, float *part) {                        \
    float32x4_t acc[MR][NR];                                                                      \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++)                                    \
        acc[i][j] = c0 ? vld1q_f32(part + 4 * (i * NR + j)) : vdupq_n_f32(0.0f);                 \
    for (int64_t c = c0; c < c1; c += 8) {                                                        \
        if (NR == NB_WIDE) for (int j = 0; j < NR; j++) __builtin_prefetch(w + (j + NR) * K + c, 0, 3); \
        uint16x8_t wv[NR];                                                                        \
        for (int j = 0; j < NR; j++) wv[j] = vld1q_u16(w + j * K + c);                            \
        for (int i = 0; i < MR; i++) {                                                            \
            const uint16x8_t xv = vld1q_u16(x + i * K + c);                                       \
            for (int j = 0; j < NR; j++) acc[i][j] = BF16_STEP(acc[i][j], xv, wv[j]);             \
        }                                                                                         \
    }                                                                                             \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++)                                    \
        if (c1 < K) vst1q_f32(part + 4 * (i * NR + j), acc[i][j]);                               \
        else y[i * N + j] = vaddvq_f32(acc[i][j]);                                               \
}
#else
#define BF16_SIMD 0  /* no vector path: bf16 models keep torch's own kernels (a scalar loop is slower) */
#endif

int bf16_simd(void) { return BF16_SIMD; }

#if BF16_SIMD
TILE16(1, NB_NARROW) TILE16(2, NB_NARROW) TILE16(1, NB_WIDE) TILE16(2, NB_WIDE) TILE16(3, NB_WIDE) TILE16(4, NB_WIDE)
TILE16(1, 1) TILE16(2, 1) TILE16(3, 1) TILE16(4, 1)

/* The weight's rows in blocks of NB_NARROW for passes of 1-2 rows (they stream the weight from memory
   and read it faster with more streams in flight), NB_WIDE for wider ones (as many accumulators as the
   registers hold; `scripts/bench_cpu_matmul.py`), the pass's rows 4 at a time. Past 4 rows, every
   4-row tile reads the same weight block again, so K is walked in chunks of KC columns (each tile's sums
   kept in `part` between chunks): a block's chunk and the rows' stay in the L1 cache while every tile
   reads them, where a whole block and the rows did not fit; and each tile of a wide block asks for the
   same columns of the next block's rows (the hardware prefetchers did not bring six short runs in time;
   asking in the first tile only was slower, 12.0 ms, as was asking for the next chunk): a 16-row
   pass over 32768 x 3072 weights from memory 14.0 -> 9.9 ms on a Zen 5 core, 115 -> 163 GMAC/s, where
   cached weights give 171. Every output is one accumulator's chain over K in the same
   order whatever the tile and the chunking, so a row's result never depends on the pass width. */
#define KC 1024
struct bf16_ctx { const uint16_t *x; int64_t M, K; const uint16_t *w; int64_t N; float *y; int64_t nb, kc; int failed; };

static void bf16_blocks(void *ctx, int64_t b0, int64_t b1) {
    struct bf16_ctx *cx = ctx;
    const uint16_t *x = cx->x, *w = cx->w;
    const int64_t M = cx->M, K = cx->K, N = cx->N, nb = cx->nb, kc = cx->kc;
    float *y = cx->y;
    for (int64_t b = b0; b < b1; b++) {
        const int64_t n0 = nb * b, nr = N - n0 < nb ? N - n0 : nb;
        float *part = kc < K ? malloc((M + 3) / 4 * 4 * nb * ACC_LANES * sizeof(float)) : 0;
        if (kc < K && !part) {
            __atomic_store_n(&cx->failed, 1, __ATOMIC_RELAXED);
            continue;
        }
        for (int64_t c0 = 0; c0 < K; c0 += kc) {
            const int64_t c1 = K - c0 <= kc ? K : c0 + kc;
            for (int64_t m = 0; m < M; m += 4) {
                const int64_t mr = M - m < 4 ? M - m : 4;
                const uint16_t *xs = x + m * K;
                float *pt = part ? part + m * nb * ACC_LANES : 0;  /* this tile's sums: 4 rows x nb */
                if (nr == nb) {
                    const uint16_t *ws = w + n0 * K;
                    float *ys = y + m * N + n0;
                    if (nb == NB_NARROW) {  /* never chunked: the constants let the compiler specialise
                                               the tiles as they were (a 1-row pass lost ~5% otherwise) */
                        if (mr == 1) TN(1, NB_NARROW)(xs, K, ws, ys, N, 0, K, 0);
                        else TN(2, NB_NARROW)(xs, K, ws, ys, N, 0, K, 0);
                    } else switch (mr) {
                        case 1: TN(1, NB_WIDE)(xs, K, ws, ys, N, c0, c1, pt); break;
                        case 2: TN(2, NB_WIDE)(xs, K, ws, ys, N, c0, c1, pt); break;
                        case 3: TN(3, NB_WIDE)(xs, K, ws, ys, N, c0, c1, pt); break;
                        default: TN(4, NB_WIDE)(xs, K, ws, ys, N, c0, c1, pt);
                    }
                } else for (int64_t n = n0; n < n0 + nr; n++) {
                    const uint16_t *ws = w + n * K;
                    float *ys = y + m * N + n, *pn = pt ? pt + (n - n0) * 4 * ACC_LANES : 0;
                    switch (mr) {
                        case 1: t16_1_1(xs, K, ws, ys, N, c0, c1, pn); break;
                        case 2: t16_2_1(xs, K, ws, ys, N, c0, c1, pn); break;
                        case 3: t16_3_1(xs, K, ws, ys, N, c0, c1, pn); break;
                        default: t16_4_1(xs, K, ws, ys, N, c0, c1, pn);
                    }
                }
            }
        }
        free(part);
    }
}

/* Returns 0, or -1 where a chunked pass's partial sums could not be allocated (y then incomplete). */
int bf16_gemm(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y, int threads) {
    const int64_t nb = M <= 2 ? NB_NARROW : NB_WIDE;
    struct bf16_ctx c = {x, M, K, w, N, y, nb, M > 4 ? KC : K, 0};
    run_ranges((N + nb - 1) / nb, 1, bf16_blocks, &c, threads);
    return c.failed ? -1 : 0;
}
#endif

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

static inline float sum_lanes(const float *a) {
    float b[8];
    for (int l = 0; l < 8; l++) b[l] = a[l] + a[l + 8];
    for (int l = 0; l < 4; l++) b[l] += b[l + 4];
    return (b[0] + b[2]) + (b[1] + b[3]);
}

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
