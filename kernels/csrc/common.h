/* What the kernel families share (threads.c, x16.c, bf16.c, attend.c, pointwise.c; their entry points are in
   cpu_kernels.h): the headers, the intrinsics of the instruction set a build is for, and `run_ranges`.
   Each family is a file of its own, compiled together into one library per instruction set
   (kernels/commands.py lists them; setup.py builds them once per variant of variants.json). */
#ifndef EDGE_DLM_COMMON_H
#define EDGE_DLM_COMMON_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "cpu_kernels.h"
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  /* x86's SIMD paths */
#elif defined(__aarch64__)
#include <arm_neon.h>   /* ARM's (NEON is part of every ARMv8-A); every other CPU builds the portable loops */
#endif

/* bfloat16 <-> float32 as torch converts: a bf16 value is the top half of a float32; rounding is to the
   nearest even, a NaN any NaN's quiet 0x7FC0 (c10's round_to_nearest_even) */
static inline float bf16_f32(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return f != f ? (uint16_t)0x7FC0 : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* 16 lanes' sum in a fixed tree (8 + 8, 4 + 4, 2 + 2, 1 + 1), whatever the build's vector width */
static inline float sum_lanes(const float *a) {
    float b[8];
    for (int l = 0; l < 8; l++) b[l] = a[l] + a[l + 8];
    for (int l = 0; l < 4; l++) b[l] += b[l + 4];
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* fn(ctx, begin, end) over [0, n) in at most `threads` ranges, each at least `grain` long, through the
   parallel function `edge_set_parallel` installed, else the kernels' own POSIX threads (threads.c).
   Internal to the library: not one of its exported symbols. */
__attribute__((visibility("hidden")))
void run_ranges(int64_t n, int64_t grain, edge_range_fn fn, void *ctx, int threads);
/* one head's row of queries or keys through the rotary embedding (pointwise.c), for `rope_attend` */
__attribute__((visibility("hidden")))
void rope_row(int bf16, const void *x, const void *cos, const void *sin, const void *qs, int64_t D, float *out);
#endif
