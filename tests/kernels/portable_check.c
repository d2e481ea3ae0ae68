/* The CPU kernels on fixed pseudo-random inputs, every output printed as a hex float: built for each
   instruction set (x86-64 with AVX-512, AVX2, none; aarch64 under qemu) by tests/kernels/test_portable.py,
   which compares the builds' outputs. Exits 1 where 3 threads differ from 1 or a row of a wide pass
   from the same row alone. Compiled together with the kernels' files (kernels/csrc/*.c). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

/* built only where a vector path exists */
#pragma weak bf16_gemm

static uint64_t state = 88172645463325252ull;
static uint32_t next(void) {  /* xorshift64: the same numbers on every machine */
    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
    return (uint32_t)(state >> 32);
}
static float uniform(void) { return (float)(next() >> 8) / (float)(1 << 24) * 2.0f - 1.0f; }
/* the kernels' own threads (no parallel function installed: POSIX threads) give the one-thread numbers */
static void same_on_threads(const float *y, const float *y3, int64_t n, int rc) {
    if (rc != 0 || memcmp(y, y3, n * sizeof(float))) {
        fprintf(stderr, "3 threads differ from 1 (rc %d)\n", rc);
        exit(1);
    }
}

/* a row's result never depends on the pass width: each row again as a pass of its own */
static void same_alone(const float *y, const float *y1, int64_t N, int64_t m) {
    if (memcmp(y + m * N, y1, N * sizeof(float))) {
        fprintf(stderr, "row %ld of a wide pass differs from the row alone\n", (long)m);
        exit(1);
    }
}

static uint16_t bf16(float f) { union { float f; uint32_t u; } v = { f }; return (uint16_t)(v.u >> 16); }
static float f32(uint16_t b) { union { uint32_t u; float f; } v = { (uint32_t)b << 16 }; return v.f; }

/* n values of dtype bf16 (1) or float32 (0) at p, as hex floats */
static void print_values(const char *head, int b, const void *p, int64_t n) {
    printf("%s b=%d", head, b);
    for (int64_t i = 0; i < n; i++) printf(" %a", b ? f32(((const uint16_t *)p)[i]) : ((const float *)p)[i]);
    printf("\n");
}

static void same_bytes(const void *a, const void *b, size_t n, const char *what) {
    if (memcmp(a, b, n)) {
        fprintf(stderr, "%s\n", what);
        exit(1);
    }
}

/* the small operations of a layer (pointwise.c) and a narrow pass's rope + cache writes + attention
   (`rope_attend`), in bf16 and float32: 3 threads as 1, each row alone as in the pass */
static void small_ops(int b) {
    state = 88172645463325252ull;  /* the same inputs whether or not a build ran the bf16 matmul before */
    const size_t e = b ? 2 : 4;
    const int64_t M = 5, H = 200, I = 72;  /* H: 12 sums of 16 lanes and a tail */
    char *x = malloc(M * H * e), *w = malloc(H * e), *y = malloc(M * H * e), *y3 = malloc(M * H * e);
    for (int64_t i = 0; i < M * H; i++) b ? (((uint16_t *)x)[i] = bf16(uniform() * 3)) : (((float *)x)[i] = uniform() * 3);
    for (int64_t i = 0; i < H; i++) b ? (((uint16_t *)w)[i] = bf16(1 + uniform())) : (((float *)w)[i] = 1 + uniform());
    rms_norm(b, x, M, H, H, w, 1e-5f, y, 1);
    rms_norm(b, x, M, H, H, w, 1e-5f, y3, 3);
    same_bytes(y, y3, M * H * e, "rms_norm: 3 threads differ from 1");
    for (int64_t m = 0; m < M; m++) {
        rms_norm(b, x + m * H * e, 1, H, H, w, 1e-5f, y3, 1);
        same_bytes(y + m * H * e, y3, H * e, "rms_norm: a row differs alone");
    }
    print_values("norm", b, y, M * H);
    /* silu(g) * u of a fused projection's two parts: rows 2I apart */
    char *gu = malloc(M * 2 * I * e), *z = malloc(M * I * e), *z3 = malloc(M * I * e);
    for (int64_t i = 0; i < M * 2 * I; i++) {
        const float v = uniform() * (i % 7 == 0 ? 100 : 6);  /* some far into either tail of e^x */
        b ? (((uint16_t *)gu)[i] = bf16(v)) : (((float *)gu)[i] = v);
    }
    silu_mul(b, gu, 2 * I, gu + I * e, 2 * I, M, I, z, 1);
    silu_mul(b, gu, 2 * I, gu + I * e, 2 * I, M, I, z3, 3);
    same_bytes(z, z3, M * I * e, "silu_mul: 3 threads differ from 1");
    print_values("silu", b, z, M * I);
    /* T = 3 new tokens after 5 cached, causal, 4 query heads over 2 K / V heads of 64 (AVX-512 builds run a
       head's first 4 rows at once, the last 2 alone), a 16-row cache */
    const int64_t T = 3, nq = 4, nkv = 2, D = 64, C = 16, len = 5, W = 16, nt = (nq + 2 * nkv) * D;
    char *qkv = malloc(T * nt * e), *cs = malloc(T * D * e), *sn = malloc(T * D * e), *qs = malloc(T * e);
    char *o = malloc(T * nq * D * e);
    float *kc = calloc(nkv * C * D, sizeof(float)), *vc = calloc(nkv * C * D, sizeof(float));
    uint8_t mask[3 * 16];
    for (int64_t i = 0; i < T * nt; i++) b ? (((uint16_t *)qkv)[i] = bf16(uniform())) : (((float *)qkv)[i] = uniform());
    for (int64_t i = 0; i < T * D; i++) {
        const float c = uniform(), s = uniform();
        b ? (((uint16_t *)cs)[i] = bf16(c), ((uint16_t *)sn)[i] = bf16(s)) : (((float *)cs)[i] = c, ((float *)sn)[i] = s);
    }
    for (int64_t t = 0; t < T; t++) b ? (((uint16_t *)qs)[t] = bf16(1.25f)) : (((float *)qs)[t] = 1.25f);
    for (int64_t i = 0; i < nkv * len * D; i++) kc[i % (nkv * C * D)] = uniform(), vc[i % (nkv * C * D)] = uniform();
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < W; j++) mask[t * W + j] = j < len || j - len <= t;
    if (rope_attend(b, qkv, nt, qkv + nq * D * e, nt, qkv + (nq + nkv) * D * e, nt, T, nq, nkv, D, cs, sn, qs, kc, vc,
                    C * D, len, mask, W, 0.25f, o, 1)) {
        fprintf(stderr, "rope_attend failed\n");
        exit(1);
    }
    print_values("rope", b, o, T * nq * D);
    printf("cache b=%d", b);  /* the rotated keys and the values, as written */
    for (int64_t h = 0; h < nkv; h++)
        for (int64_t i = len * D; i < (len + T) * D; i++) printf(" %a %a", kc[h * C * D + i], vc[h * C * D + i]);
    printf("\n");
    free(x), free(w), free(y), free(y3), free(gu), free(z), free(z3), free(qkv), free(cs), free(sn), free(qs), free(o);
    free(kc), free(vc);
}

int main(void) {
    const int64_t K = 256, N = 40, nb = (N + 15) / 16;
    const int64_t Ms[] = {1, 3, 5, 16, 17};
    for (int zp = 0; zp <= 1; zp++)  /* symmetric (signed weights), then unsigned with zero points */
    for (int bits = 8; bits >= 4; bits -= 4)
        for (int64_t G = 32; G <= 64; G *= 2)
            for (int mi = 0; mi < 5; mi++) {
                const int64_t M = Ms[mi], ng = K / G, row = K * bits / 8;
                uint8_t *q = malloc(N * row), *w = malloc(nb * 16 * row);
                uint16_t *s = malloc(nb * ng * 16 * sizeof(uint16_t)), *z = malloc(nb * ng * 16 * sizeof(uint16_t));
                float *x = malloc(M * K * sizeof(float)), *y = malloc(M * N * sizeof(float));
                float *y3 = malloc(M * N * sizeof(float));
                for (int64_t i = 0; i < N * row; i++) q[i] = (uint8_t)next();
                for (int64_t i = 0; i < nb * ng * 16; i++) s[i] = (uint16_t)(0x1C00 | (next() & 0x3FF));
                for (int64_t i = 0; i < nb * ng * 16; i++) z[i] = (uint16_t)(0xBC00 | (next() & 0x3FF));
                for (int64_t i = 0; i < M * K; i++) x[i] = uniform();
                x16_pack(bits, !zp, q, N, K, w, 1);
                x16_gemm(bits, x, M, K, w, s, zp ? z : 0, N, G, y, 1);
                same_on_threads(y, y3, M * N, x16_gemm(bits, x, M, K, w, s, zp ? z : 0, N, G, y3, 3));
                for (int64_t m = 0; m < M; m++) {
                    x16_gemm(bits, x + m * K, 1, K, w, s, zp ? z : 0, N, G, y3, 1);
                    same_alone(y, y3, N, m);
                }
                printf("x16 bits=%d G=%ld M=%ld z=%d", bits, (long)G, (long)M, zp);
                for (int64_t i = 0; i < M * N; i++) printf(" %a", y[i]);
                printf("\n");
                free(q); free(w); free(s); free(z); free(x); free(y); free(y3);
            }
    const int64_t K2 = 2048, Ms2[] = {1, 4, 7, 33};
    for (int mi = 0; bf16_gemm && mi < 4; mi++) {
        const int64_t M = Ms2[mi];
        uint16_t *x = malloc(M * K2 * 2), *w = malloc(N * K2 * 2);
        float *y = malloc(M * N * sizeof(float)), *y3 = malloc(M * N * sizeof(float));
        for (int64_t i = 0; i < M * K2; i++) x[i] = bf16(uniform());
        for (int64_t i = 0; i < N * K2; i++) w[i] = bf16(uniform() * 0.05f);
        bf16_gemm(x, M, K2, w, N, y, 1);
        same_on_threads(y, y3, M * N, bf16_gemm(x, M, K2, w, N, y3, 3));
        for (int64_t m = 0; m < M; m++) {
            bf16_gemm(x + m * K2, 1, K2, w, N, y3, 1);
            same_alone(y, y3, N, m);
        }
        printf("bf16 M=%ld", (long)M);
        for (int64_t i = 0; i < M * N; i++) printf(" %a", y[i]);
        printf("\n");
        free(x); free(w); free(y); free(y3);
    }
    small_ops(1);
    small_ops(0);
    fprintf(stderr, "x16_simd=%d\n", x16_simd());
    return 0;
}
