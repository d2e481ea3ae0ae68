/* What the kernel families share (threads.c, x16.c, bf16.c, attend.c; their entry points are in
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

/* fn(ctx, begin, end) over [0, n) in at most `threads` ranges, each at least `grain` long, through the
   parallel function `edge_set_parallel` installed, else the kernels' own POSIX threads (threads.c).
   Internal to the library: not one of its exported symbols. */
__attribute__((visibility("hidden")))
void run_ranges(int64_t n, int64_t grain, edge_range_fn fn, void *ctx, int threads);
#endif
