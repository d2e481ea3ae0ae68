/* The CPU kernels' entry points (threads.c, x16.c, bf16.c, attend.c, pointwise.c), shared by the torch
   operators (cpu_ops.cpp), the C test harness (tests/kernels/portable_check.c) and, through ctypes,
   kernels/cpu_matmul.py. Arrays are contiguous but where a row stride is passed; the kernels trust their
   callers, which check shapes and types (cpu_ops.cpp). The gemm / attention entries return 0, or -1 where
   their scratch memory could not be allocated. */
#ifndef EDGE_DLM_CPU_KERNELS_H
#define EDGE_DLM_CPU_KERNELS_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Threads: each kernel splits its output into independent ranges [begin, end) and runs fn(ctx, begin, end)
   over them through the parallel function installed here: the torch operators install ATen's parallel_for
   (cpu_ops.cpp: torch's own threads, as many as torch.get_num_threads()); none installed, a call runs on up to
   its `threads` argument of POSIX threads of its own. Either way the same ranges, the same results. */
typedef void (*edge_range_fn)(void *ctx, int64_t begin, int64_t end);
typedef void (*edge_parallel_fn)(int64_t n, int64_t grain, edge_range_fn fn, void *ctx);
void edge_set_parallel(edge_parallel_fn fn);

/* which vector path this build took: 512 (AVX-512), 256 (AVX2 / AVX-VNNI) or 0 (portable C) */
int x16_simd(void);
int bf16_simd(void);

/* y [M, N] = x [M, K] . W^T, W int8 / int4 in the 16-row layout (x16_pack), fp16 scales s / zero points z
   (NULL: symmetric) per group of G columns; K % 32 == 0, G a power of two >= 32 dividing K */
int x16_gemm(int bits, const float *x, int64_t M, int64_t K, const uint8_t *w, const uint16_t *s, const uint16_t *z,
             int64_t N, int64_t G, float *y, int threads);
void x16_pack(int bits, int signed_w, const uint8_t *q, int64_t N, int64_t K, uint8_t *w, int threads);
void x16_unpack(int bits, int signed_w, const uint8_t *w, int64_t N, int64_t K, uint8_t *q, int threads);

/* y [M, N] float32 = x [M, K] . w [N, K]^T, both bfloat16 (only where bf16_simd() is not 0) */
int bf16_gemm(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y, int threads);

/* attention of q [H, R, D] over the first `keys` rows of k / v (head h at k + h * hs) under mask [T, W] */
int attend(const float *q, int64_t H, int64_t R, int64_t T, int64_t D, const float *k, const float *v, int64_t hs,
           const uint8_t *mask, int64_t W, int64_t keys, float scale, float *out, int threads);

/* the small operations between a layer's matmuls (pointwise.c), bf16 (bf16 = 1) or float32, a row at a time:
   y [M, H] = w * round(x * (1 / sqrt(mean(x^2) + eps))) (RMSNorm; x's rows xs elements apart), and
   y [M, I] = silu(g) * u (g / u rows gs / us elements apart) */
void rms_norm(int bf16, const void *x, int64_t M, int64_t H, int64_t xs, const void *w, float eps, void *y,
              int threads);
void silu_mul(int bf16, const void *g, int64_t gs, const void *u, int64_t us, int64_t M, int64_t I, void *y,
              int threads);

/* a narrow pass's rotary embedding, K / V cache writes and attention in one call (attend.c) */
int rope_attend(int bf16, const void *q, int64_t qs, const void *k, int64_t ks, const void *v, int64_t vs,
                int64_t T, int64_t nq, int64_t nkv, int64_t D, const void *cos, const void *sin, const void *qscale,
                float *kc, float *vc, int64_t hs, int64_t length, const uint8_t *mask, int64_t W, float scale,
                void *out, int threads);

#ifdef __cplusplus
}
#endif
#endif
