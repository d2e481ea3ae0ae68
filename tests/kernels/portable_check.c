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
    fprintf(stderr, "x16_simd=%d\n", x16_simd());
    return 0;
}
