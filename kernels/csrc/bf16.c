#include "common.h"

/* ---- bf16 */
#define TILE16(MR, NR) TILE16_(MR, NR)  /* expands NB_NARROW / NB_WIDE before pasting the name */
#define TN_(MR, NR) t16_##MR##_##NR
#define TN(MR, NR) TN_(MR, NR)
#if defined(__AVX512F__)
#define BF16_SIMD 512
#define NB_NARROW 12  /* 1-2 row passes: 12 weight streams read memory faster than 8 (NLD-3B's up projection,
                         one Zen 5 core: 1 row 2.51 -> 2.30 ms, 25 GB/s; 2 rows 2.96 -> 2.61 ms; 16 no faster;
                         scripts/bench_cpu_matmul.py, bench_results/bf16_narrow_streams.json) */
#define NB_WIDE 6   /* 4 x 6 accumulators + 6 weight vectors + 1 input vector = 31 of 32 registers */
#define ACC_LANES 16
#if defined(__AVX512BF16__)
/* 1-2 row passes over rows of up to this many columns read the weight a row at a time, one sequential
   stream, which the prefetchers follow best: 34-36 GB/s against 27-29 for 12 streams at K = 2048-6144
   on one Zen 5 core; at K = 9216 the row and the input no longer share the L1 cache as well and 12 streams
   win, 31 vs 24 (a standalone sweep of K and streams, session 14). One chain of `vdpbf16ps` a row keeps
   up with memory; the widened paths below would wait on their chains' latency (AVX2: 16 vs 22 GB/s).
   (Asking for the weight ahead as non-temporal, `prefetchnta`, kept a standalone stream's rate and the
   caches' other contents, but made a 26-layer decode step 17% slower: 253 -> 297 ms.) */
#define ONE_STREAM_K 8192
static void one_stream(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, float *y, int64_t N) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();  /* the tiles' chains: one a row over K */
    for (int64_t c = 0; c < K; c += 32) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + c);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + c), wv);
        if (M == 2) a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(x + K + c), wv);
    }
    y[0] = _mm512_reduce_add_ps(a0);
    if (M == 2) y[N] = _mm512_reduce_add_ps(a1);
}
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

#ifdef __AVX512BF16__
static void bf16_rows(void *ctx, int64_t n0, int64_t n1) {  /* 1-2 row passes a weight row at a time */
    struct bf16_ctx *cx = ctx;
    for (int64_t n = n0; n < n1; n++) one_stream(cx->x, cx->M, cx->K, cx->w + n * cx->K, cx->y + n, cx->N);
}
#endif

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
#ifdef __AVX512BF16__
    if (M <= 2 && K <= ONE_STREAM_K) {
        run_ranges(N, 1, bf16_rows, &c, threads);
        return 0;
    }
#endif
    run_ranges((N + nb - 1) / nb, 1, bf16_blocks, &c, threads);
    return c.failed ? -1 : 0;
}
#endif
