"""Matmuls for narrow passes on the CPU that read the weights as they are stored: group-wise int8
(`int8_gemm`, for `QuantLinear`) and bfloat16 (`bf16_gemm`, for `Bf16Linear`).

Why our own: torch has no group-wise int8 CPU kernel (its `_weight_int8pack_mm` is per channel, and
run once per group it was slower than a bf16 model), so the reference dequantized every weight to
float on every pass (0.03x llama.cpp's Q8_0 decode at the NLD-3B shape); and torch's bf16 matrix-vector
product reads ~18 GB/s on a Zen 4 core where the memory gives ~40. The kernels are a page of C with
AVX-512 (AVX512-BF16 dot products for bf16), compiled once per machine with the system compiler
(`-O3 -march=native`, OpenMP over output rows) into the edge-dlm cache folder and called through torch
custom ops, so a compiled pass (`--compile on`) keeps them in its graph:

    int8:  y[m, n] = sum over chunks c of  x[m, c] . (s[n, group of c] * w[n, c])
    bf16:  y[m, n] = sum over chunks c of  x[m, c] . w[n, c]           (bf16 pairs, float32 sums)

Each (m, n) is computed by the same operations whatever the pass width M, so a row's result never
depends on how many rows the pass has (LinearSpec's verify pass and AR's step agree bit for bit);
output rows are split over threads, never a reduction. A register tile of up to 4 x rows by 4 weight
rows shares every load, so narrow passes cost little more than one row; wider ones (`MAX_ROWS`: prefill
chunks, QuadraticSpec's cycle) dequantize (int8) and run torch's GEMM. int8 activations are float32
(bf16 / fp16 inputs are widened), its scales float32 (kept next to the fp16 ones,
`QuantLinear.derived`); symmetric weights only (asymmetric ones stay on the reference). Without a C
compiler neither is used and the reference serves.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = r"""
#include <stdint.h>
#include <immintrin.h>

/* Two matmuls for narrow passes, y [M, N] = x [M, K] . W [N, K]^T with W read as stored:
     int8_gemm: x float32, W group-wise int8 (w [N, K] int8, s [N, K / G] float32, G a power of two);
     bf16_gemm: x and W bfloat16 (their bit patterns), sums in float32.
   A register tile of up to 4 x rows by 4 weight rows shares every load. Each output (m, n) has its
   own accumulator, fed chunk after chunk in K order (16 floats of int8: widened, scaled s * w, fused
   multiply-add; 32 bf16: one AVX512-BF16 pair dot product) and summed across its lanes at the end:
   the same operations in the same order whatever M is and whichever rows share a tile, so a row's
   result never depends on the pass width. Output rows are split over threads, never a reduction. */

#if defined(__AVX512F__)
static inline __m512 w8(const int8_t *w, float s) {
    return _mm512_mul_ps(_mm512_set1_ps(s), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w))));
}
/* int8: each (m, n) keeps 4 accumulators, chunk c going to chain (c / 16) % 4 (a K % 64 tail to
   chain 0), summed in a fixed order at the end: the conversions and the FMA latency then overlap
   even for one row. One row streams its weight rows one at a time (1 x 1 tiles: 27 GB/s on a Zen 4
   core, where 1 x 4 tiles reading four rows at once gave 15); wider passes take 2 x 2 tiles. */
#define CH 4
#define TILE8(MR, NR)                                                                             \
static void t8_##MR##_##NR(const float *x, int64_t K, const int8_t *w, const float *s, int64_t ng,  \
                           int gs, float *y, int64_t N) {                                         \
    __m512 acc[MR][NR][CH];                                                                       \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) for (int k = 0; k < CH; k++)        \
        acc[i][j][k] = _mm512_setzero_ps();                                                       \
    int64_t c = 0;                                                                                \
    for (; c + 16 * CH <= K; c += 16 * CH)                                                        \
        for (int k = 0; k < CH; k++) {                                                            \
            __m512 wf[NR];                                                                        \
            for (int j = 0; j < NR; j++) wf[j] = w8(w + j * K + c + 16 * k, s[j * ng + ((c + 16 * k) >> gs)]); \
            for (int i = 0; i < MR; i++) {                                                        \
                __m512 xv = _mm512_loadu_ps(x + i * K + c + 16 * k);                              \
                for (int j = 0; j < NR; j++) acc[i][j][k] = _mm512_fmadd_ps(xv, wf[j], acc[i][j][k]); \
            }                                                                                     \
        }                                                                                         \
    for (; c < K; c += 16) {                                                                      \
        __m512 wf[NR];                                                                            \
        for (int j = 0; j < NR; j++) wf[j] = w8(w + j * K + c, s[j * ng + (c >> gs)]);            \
        for (int i = 0; i < MR; i++) {                                                            \
            __m512 xv = _mm512_loadu_ps(x + i * K + c);                                           \
            for (int j = 0; j < NR; j++) acc[i][j][0] = _mm512_fmadd_ps(xv, wf[j], acc[i][j][0]);  \
        }                                                                                         \
    }                                                                                             \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++)                                     \
        y[i * N + j] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[i][j][0], acc[i][j][1]), \
                                                          _mm512_add_ps(acc[i][j][2], acc[i][j][3]))); \
}
TILE8(1, 1) TILE8(2, 2) TILE8(2, 1) TILE8(1, 2)

#if defined(__AVX512BF16__)
#define BF16_CHUNK 32
#define TILE16(MR, NR)                                                                            \
static void t16_##MR##_##NR(const uint16_t *x, int64_t K, const uint16_t *w, float *y, int64_t N) { \
    __m512 acc[MR][NR];                                                                           \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();    \
    for (int64_t c = 0; c < K; c += 32) {                                                         \
        __m512bh wv[NR];                                                                          \
        for (int j = 0; j < NR; j++) wv[j] = (__m512bh)_mm512_loadu_si512(w + j * K + c);         \
        for (int i = 0; i < MR; i++) {                                                            \
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * K + c);                            \
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);     \
        }                                                                                         \
    }                                                                                             \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) y[i * N + j] = _mm512_reduce_add_ps(acc[i][j]); \
}
#else  /* no AVX512-BF16: widen both to float32 (a 16-bit shift) and fused multiply-add */
static inline __m512 widen(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#define TILE16(MR, NR)                                                                            \
static void t16_##MR##_##NR(const uint16_t *x, int64_t K, const uint16_t *w, float *y, int64_t N) { \
    __m512 acc[MR][NR];                                                                           \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();    \
    for (int64_t c = 0; c < K; c += 16) {                                                         \
        __m512 wv[NR];                                                                            \
        for (int j = 0; j < NR; j++) wv[j] = widen(w + j * K + c);                                \
        for (int i = 0; i < MR; i++) {                                                            \
            __m512 xv = widen(x + i * K + c);                                                     \
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);       \
        }                                                                                         \
    }                                                                                             \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) y[i * N + j] = _mm512_reduce_add_ps(acc[i][j]); \
}
#endif
TILE16(1, 4) TILE16(2, 4) TILE16(3, 4) TILE16(4, 4) TILE16(1, 1) TILE16(2, 1) TILE16(3, 1) TILE16(4, 1)

#endif

void int8_gemm(const float *x, int64_t M, int64_t K, const int8_t *w, const float *s, int64_t N,
               int64_t G, float *y, int threads) {
    const int64_t ng = K / G;
    int gs = 0;
    while ((1 << gs) < G) gs++;
    const int64_t nb = 2;  /* weight rows per block: 2 x 2 tiles (one row: 1 x 1, see above) */
    const int64_t blocks = (N + nb - 1) / nb;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = nb * b, nr = N - n0 < nb ? N - n0 : nb;
#if defined(__AVX512F__)
        if (M == 1) {
            for (int64_t n = n0; n < n0 + nr; n++) t8_1_1(x, K, w + n * K, s + n * ng, ng, gs, y + n, N);
            continue;
        }
        for (int64_t m = 0; m < M; m += 2) {
            const float *xs = x + m * K;
            float *ys = y + m * N + n0;
            if (M - m >= 2 && nr == 2) t8_2_2(xs, K, w + n0 * K, s + n0 * ng, ng, gs, ys, N);
            else if (M - m >= 2) t8_2_1(xs, K, w + n0 * K, s + n0 * ng, ng, gs, ys, N);
            else if (nr == 2) t8_1_2(xs, K, w + n0 * K, s + n0 * ng, ng, gs, ys, N);
            else t8_1_1(xs, K, w + n0 * K, s + n0 * ng, ng, gs, ys, N);
        }
#else
        for (int64_t i = 0; i < M; i++)
            for (int64_t n = n0; n < n0 + nr; n++) {
                float acc = 0.0f;
                for (int64_t c = 0; c < K; c++) acc += x[i * K + c] * (s[n * ng + (c >> gs)] * (float)w[n * K + c]);
                y[i * N + n] = acc;
            }
#endif
    }
}

void bf16_gemm(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y, int threads) {
    const int64_t blocks = (N + 3) / 4;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = 4 * b, nr = N - n0 < 4 ? N - n0 : 4;
        for (int64_t m = 0; m < M; m += 4) {
            const int64_t mr = M - m < 4 ? M - m : 4;
#if defined(__AVX512F__)
            for (int64_t j = 0; j < (nr == 4 ? 1 : nr); j++) {
                const int64_t n = n0 + j;
                const uint16_t *xs = x + m * K, *ws = w + n * K;
                float *ys = y + m * N + n;
                if (nr == 4) switch (mr) {
                    case 1: t16_1_4(xs, K, ws, ys, N); break;
                    case 2: t16_2_4(xs, K, ws, ys, N); break;
                    case 3: t16_3_4(xs, K, ws, ys, N); break;
                    default: t16_4_4(xs, K, ws, ys, N);
                } else switch (mr) {
                    case 1: t16_1_1(xs, K, ws, ys, N); break;
                    case 2: t16_2_1(xs, K, ws, ys, N); break;
                    case 3: t16_3_1(xs, K, ws, ys, N); break;
                    default: t16_4_1(xs, K, ws, ys, N);
                }
            }
#else
            for (int64_t i = m; i < m + mr; i++)
                for (int64_t n = n0; n < n0 + nr; n++) {
                    float acc = 0.0f;
                    for (int64_t c = 0; c < K; c++) {
                        union { uint32_t u; float f; } a = { (uint32_t)x[i * K + c] << 16 }, b = { (uint32_t)w[n * K + c] << 16 };
                        acc += a.f * b.f;
                    }
                    y[i * N + n] = acc;
                }
#endif
        }
    }
}
"""
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]  # no -ffast-math: the order above is kept


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-dlm" / "kernels"


def _cpu_key() -> str:
    """The build depends on the source, the flags and this CPU's instruction set (-march=native)."""
    flags = ""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha256("\n".join([SOURCE, " ".join(FLAGS), platform.machine(), flags]).encode()).hexdigest()[:16]


def available() -> list[str]:
    """Why the CPU kernel cannot be built here (empty: it can)."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        return ["no C compiler (cc) to build the CPU int8 kernel"]
    return []


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The compiled kernel, built once per machine into the edge-dlm cache (atomic rename)."""
    out = _cache_dir() / f"cpu_matmul-{_cpu_key()}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        cc = shutil.which("cc") or shutil.which("gcc")
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            src, so = Path(tmp) / "cpu_matmul.c", Path(tmp) / "cpu_matmul.so"
            src.write_text(SOURCE)
            subprocess.run([cc, *FLAGS, str(src), "-o", str(so)], check=True, capture_output=True)
            os.replace(so, out)
    lib = ctypes.CDLL(str(out))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.int8_gemm.restype = lib.bf16_gemm.restype = None
    lib.int8_gemm.argtypes = [p, i64, i64, p, p, i64, i64, p, ctypes.c_int]
    lib.bf16_gemm.argtypes = [p, i64, i64, p, i64, p, ctypes.c_int]
    return lib


@torch.library.custom_op("edge_dlm::int8_gemm", mutates_args=())
def int8_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """`x [M, K]` float32 . dequant(`qweight [N, K]` int8, `scales [N, K / group]` float32)^T -> `[M, N]`."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    library().int8_gemm(x.data_ptr(), m, k, qweight.data_ptr(), scales.data_ptr(), n, group, y.data_ptr(),
                        torch.get_num_threads())
    return y


@int8_gemm.register_fake
def _(x, qweight, scales, group):
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.float32)


@torch.library.custom_op("edge_dlm::bf16_gemm", mutates_args=())
def bf16_gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x [M, K]` bfloat16 . `weight [N, K]` bfloat16^T -> `[M, N]` float32 (sums in float32)."""
    x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    library().bf16_gemm(x.data_ptr(), m, k, weight.data_ptr(), n, y.data_ptr(), torch.get_num_threads())
    return y


@bf16_gemm.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


class Bf16Linear(torch.nn.Linear):
    """`nn.Linear` with bf16 weights on the CPU: passes up to `MAX_ROWS` rows through `bf16_gemm`
    (AVX512-BF16 dot products; torch's bf16 matrix-vector product reads ~18 GB/s on a Zen 4 core),
    wider ones through torch's GEMM. A row's result never depends on the width within either route."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.bias is not None or x2.shape[0] > MAX_ROWS or self.in_features % 32 or x.dtype != torch.bfloat16:
            return super().forward(x)
        return bf16_gemm(x2, self.weight).to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def enable_bf16(model: torch.nn.Module) -> int:
    """Route `model`'s bf16 CPU linears through `Bf16Linear`; returns how many (0 without a compiler)."""
    if not usable():
        return 0
    n = 0
    for mod in model.modules():
        if type(mod) is torch.nn.Linear and mod.weight.dtype == torch.bfloat16 and mod.weight.device.type == "cpu":
            mod.__class__ = Bf16Linear
            n += 1
    return n


@torch.library.custom_op("edge_dlm::int8_dequant_mm", mutates_args=())
def int8_dequant_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """The wide-pass route, `edge_dlm.model.quant.linear_ref` exactly: the weight dequantized in x's
    dtype (bf16 GEMMs are the CPU's fast ones), then torch's GEMM -> `[M, N]` in x's dtype."""
    from edge_dlm.model.quant import dequantize

    return torch.nn.functional.linear(x, dequantize(qweight, scales, None, 8, x.dtype))


@int8_dequant_mm.register_fake
def _(x, qweight, scales, group):
    return x.new_empty(x.shape[0], qweight.shape[0])


def _float_scales(mod) -> torch.Tensor:
    return mod.derived("cpu-int8-scales", lambda q: q.scales.float().contiguous())


MAX_ROWS = 32  # wider passes (prefill chunks, QuadraticSpec's B(B+1) cycle) are compute bound: dequantize + GEMM


def cpu_int8_matmul(x: torch.Tensor, mod) -> torch.Tensor | None:
    """The `register_matmul("int8", "cpu", ...)` entry: symmetric edge-dlm layout, passes of up to
    `MAX_ROWS` rows (AR steps, drafts, verify and commit passes of a block of up to 32 tokens)."""
    if mod.zeros is not None or mod.perm is not None or mod.qweight.dtype != torch.int8 \
            or mod.in_features % 16 or mod.spec.group_size % 16:
        return None
    x2 = x.reshape(-1, mod.in_features)
    if x2.shape[0] > MAX_ROWS:  # wide: the reference (dequantize in x's dtype + torch's GEMM); inside a
        if not torch.compiler.is_compiling():  # compile as one opaque op (inductor fused it 3x slower)
            return None
        y = int8_dequant_mm(x2, mod.qweight, mod.scales, mod.spec.group_size)
    else:
        y = int8_gemm(x2.float(), mod.qweight, _float_scales(mod), mod.spec.group_size)
    return y.to(x.dtype).reshape(*x.shape[:-1], mod.out_features)


cpu_int8_matmul.prepare = _float_scales


def usable() -> bool:
    """Whether the kernels can be built and loaded here (else the references serve)."""
    if available():
        return False
    try:
        library()
    except (OSError, subprocess.CalledProcessError):  # a compiler that cannot build them
        return False
    return True


def enable() -> bool:
    """Route CPU int8 `QuantLinear` matmuls here (when a C compiler is present)."""
    from edge_dlm.model.quant import register_matmul

    if not usable():
        return False
    register_matmul("int8", "cpu", cpu_int8_matmul)
    return True
