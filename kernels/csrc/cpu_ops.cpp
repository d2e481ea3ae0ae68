// The CPU kernels as torch operators (edge_dlm::x16_gemm / bf16_gemm / attend / rms_norm / silu_mul /
// rope_attend): each checks what it is given (shapes, dtypes, layout sizes, group sizes, the cache rows it
// writes) and raises one clear error; the kernels themselves (kernels/csrc/*.c, bound by pointer:
// `edge_dlm_bind`) trust their inputs.
#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_kernels.h"

static decltype(&x16_gemm) x16_kernel = nullptr;
static decltype(&bf16_gemm) bf16_kernel = nullptr;
static decltype(&attend) attend_kernel = nullptr;
static decltype(&rms_norm) norm_kernel = nullptr;
static decltype(&silu_mul) silu_kernel = nullptr;
static decltype(&rope_attend) rope_attend_kernel = nullptr;

extern "C" void edge_dlm_bind(void *x16, void *bf16, void *att, void *norm, void *silu, void *rope_att) {
    x16_kernel = reinterpret_cast<decltype(&x16_gemm)>(x16);
    bf16_kernel = reinterpret_cast<decltype(&bf16_gemm)>(bf16);
    attend_kernel = reinterpret_cast<decltype(&attend)>(att);
    norm_kernel = reinterpret_cast<decltype(&rms_norm)>(norm);
    silu_kernel = reinterpret_cast<decltype(&silu_mul)>(silu);
    rope_attend_kernel = reinterpret_cast<decltype(&rope_attend)>(rope_att);
}

// The kernels' threads are torch's: each kernel's ranges through ATen's parallel_for (installed into the
// kernels library by `edge_set_parallel`, kernels/cpu_build.py `bind`), no pool of their own beside torch's.
// parallel_for runs in parallel only where this file is built with torch's threading (INTRA_OP_PARALLEL:
// OpenMP's, kernels/commands.py `operators`); elsewhere none is installed and the kernels run their own
// threads for the call.
#ifdef INTRA_OP_PARALLEL
static void aten_parallel(int64_t n, int64_t grain, edge_range_fn fn, void *ctx) {
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { fn(ctx, begin, end); });
}

extern "C" void *edge_dlm_parallel() { return reinterpret_cast<void *>(&aten_parallel); }
#else
extern "C" void *edge_dlm_parallel() { return nullptr; }
#endif

static void check(const at::Tensor &t, const char *name) {
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), name, " must be a contiguous CPU tensor");
}

static at::Tensor x16_gemm_op(const at::Tensor &x_, const at::Tensor &weight, const at::Tensor &scales,
                           const std::optional<at::Tensor> &zeros, int64_t bits, int64_t group, int64_t n) {
    TORCH_CHECK(x16_kernel, "edge_dlm::x16_gemm: kernels not bound");
    TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat, "x16_gemm takes x [M, K] float32");
    at::Tensor x = x_.contiguous();
    check(weight, "weight"), check(scales, "scales");
    const int64_t K = x.size(1), blocks = (n + 15) / 16;
    TORCH_CHECK(bits == 8 || bits == 4, "x16_gemm: bits must be 8 or 4, not ", bits);
    TORCH_CHECK(K > 0 && K % 32 == 0, "x16_gemm: K must be a positive multiple of 32, not ", K);
    TORCH_CHECK(group >= 32 && (group & (group - 1)) == 0 && K % group == 0,
                "x16_gemm: the group size must be a power of two >= 32 dividing K (", K, "), not ", group);
    TORCH_CHECK(n > 0 && weight.scalar_type() == at::kByte && weight.numel() == blocks * 16 * K * bits / 8,
                "x16_gemm: weight must be the 16-row uint8 layout of ", n, " x ", K, " (", blocks * 16 * K * bits / 8,
                " bytes), not ", weight.numel(), " ", weight.scalar_type());
    const int64_t groups = blocks * (K / group) * 16;
    TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.numel() == groups,
                "x16_gemm: scales must be ", groups, " float16 values");
    if (zeros) {
        check(*zeros, "zeros");
        TORCH_CHECK(zeros->scalar_type() == at::kHalf && zeros->numel() == groups,
                    "x16_gemm: zeros must be ", groups, " float16 values");
    }
    at::Tensor y = at::empty({x.size(0), n}, x.options());
    if (x.size(0) == 0) return y;
    const int rc = x16_kernel((int)bits, x.data_ptr<float>(), x.size(0), K, (const uint8_t *)weight.data_ptr(),
                              (const uint16_t *)scales.data_ptr(), zeros ? (const uint16_t *)zeros->data_ptr() : nullptr,
                              n, group, y.data_ptr<float>(), at::get_num_threads());
    TORCH_CHECK(rc == 0, "x16_gemm: out of memory for the rounded activations of ", x.size(0), " x ", K);
    return y;
}

static at::Tensor bf16_gemm_op(const at::Tensor &x_, const at::Tensor &weight, bool bf16_out) {
    TORCH_CHECK(bf16_kernel, "edge_dlm::bf16_gemm: not built for this CPU");
    TORCH_CHECK(x_.dim() >= 2 && weight.dim() == 2 && x_.scalar_type() == at::kBFloat16 &&
                weight.scalar_type() == at::kBFloat16, "bf16_gemm takes x [..., M, K] and weight [N, K] bfloat16");
    const at::Tensor x = x_.reshape({-1, x_.size(-1)}).contiguous();
    check(weight, "weight");
    TORCH_CHECK(x.size(1) == weight.size(1) && x.size(1) % 32 == 0,
                "bf16_gemm: x and weight must share K, a multiple of 32 (", x.size(1), ", ", weight.size(1), ")");
    std::vector<int64_t> shape(x_.sizes().begin(), x_.sizes().end());
    shape.back() = weight.size(0);
    at::Tensor y = at::empty(shape, x.options().dtype(at::kFloat));
    if (x.size(0) == 0 || weight.size(0) == 0) return bf16_out ? y.to(at::kBFloat16) : y;
    const int rc = bf16_kernel((const uint16_t *)x.data_ptr(), x.size(0), x.size(1), (const uint16_t *)weight.data_ptr(),
                               weight.size(0), y.data_ptr<float>(), at::get_num_threads());
    TORCH_CHECK(rc == 0, "bf16_gemm: out of memory for the partial sums of ", x.size(0), " rows");
    if (!bf16_out) return y;
    // rounded as torch's `.to(torch.bfloat16)` rounds (c10::BFloat16: to nearest even), in this call
    at::Tensor out = at::empty(shape, x.options());
    const float *src = y.data_ptr<float>();
    c10::BFloat16 *dst = out.data_ptr<c10::BFloat16>();
    for (int64_t i = 0, n = y.numel(); i < n; i++) dst[i] = c10::BFloat16(src[i]);
    return out;
}

static at::Tensor attend_op(const at::Tensor &q_, const at::Tensor &k, const at::Tensor &v, const at::Tensor &mask_,
                         const at::Tensor &length, double scale) {
    TORCH_CHECK(attend_kernel, "edge_dlm::attend: kernels not bound");
    const at::Tensor q = q_.contiguous(), mask = mask_.contiguous();
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.scalar_type() == at::kFloat &&
                k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat, "attend takes float32 q, k, v [H, *, D]");
    const int64_t H = q.size(0), R = q.size(1), D = q.size(2), W = k.size(1), T = mask.size(0);
    TORCH_CHECK(k.sizes() == v.sizes() && k.strides() == v.strides() && k.size(0) == H &&
                k.size(2) == D && k.stride(2) == 1 && k.stride(1) == D && D % 16 == 0,
                "attend: k / v [H, W, D] with rows of D (a multiple of 16) side by side");
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(1) == W &&
                R % T == 0 && length.scalar_type() == at::kLong && length.numel() == 1, "attend: mask [T, W] bool, length");
    const int64_t keys = std::min(W, *length.data_ptr<int64_t>() + T);
    TORCH_CHECK(keys >= T, "attend: negative cache length");
    TORCH_CHECK(k.is_cpu() && v.is_cpu() && q.is_cpu() && H > 0, "attend: CPU tensors");
    at::Tensor out = at::empty(q.sizes(), q.options());
    const int rc = attend_kernel(q.data_ptr<float>(), H, R, T, D, k.data_ptr<float>(), v.data_ptr<float>(), k.stride(0),
                                 reinterpret_cast<const uint8_t *>(mask.data_ptr<bool>()), W, keys, (float)scale,
                                 out.data_ptr<float>(), at::get_num_threads());
    TORCH_CHECK(rc == 0, "attend: out of memory for the scores of ", keys, " keys");
    return out;
}

// The activations of the small operations: bfloat16 or float32, rows of unit stride
static bool activations(const at::Tensor &t) {
    return (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat) && t.dim() >= 1 && t.stride(-1) == 1 &&
           t.device().is_cpu();
}

// [..., C] as [rows, C]: a view where one stride reaches every row (their distance is the kernels' row stride:
// one part of a fused projection is read in place), else a copy
static at::Tensor rows(const at::Tensor &t) { return t.reshape({-1, t.size(-1)}); }

static at::Tensor rms_norm_op(const at::Tensor &x, const at::Tensor &weight, double eps) {
    TORCH_CHECK(norm_kernel, "edge_dlm::rms_norm: kernels not bound");
    TORCH_CHECK(activations(x) && weight.scalar_type() == x.scalar_type() && weight.dim() == 1 &&
                weight.size(0) == x.size(-1) && weight.is_contiguous(),
                "rms_norm takes x [..., H] and weight [H] of one dtype, bfloat16 or float32 (", x.scalar_type(), ", ",
                weight.scalar_type(), ")");
    const at::Tensor x2 = rows(x);
    at::Tensor y = at::empty(x.sizes(), x.options());
    norm_kernel(x.scalar_type() == at::kBFloat16, x2.data_ptr(), x2.size(0), x2.size(1), x2.stride(0),
                weight.data_ptr(), (float)eps, y.data_ptr(), at::get_num_threads());
    return y;
}

static at::Tensor silu_mul_op(const at::Tensor &gate, const at::Tensor &up) {
    TORCH_CHECK(silu_kernel, "edge_dlm::silu_mul: kernels not bound");
    TORCH_CHECK(activations(gate) && activations(up) && gate.scalar_type() == up.scalar_type() &&
                gate.sizes() == up.sizes(), "silu_mul takes gate and up [..., I] of one shape and dtype, bfloat16 or float32");
    const at::Tensor g = rows(gate), u = rows(up);
    at::Tensor y = at::empty(gate.sizes(), gate.options());
    silu_kernel(gate.scalar_type() == at::kBFloat16, g.data_ptr(), g.stride(0), u.data_ptr(), u.stride(0), g.size(0),
                g.size(1), y.data_ptr(), at::get_num_threads());
    return y;
}

static at::Tensor rope_attend_op(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &cos,
                                 const at::Tensor &sin, const at::Tensor &qscale, at::Tensor &k_cache, at::Tensor &v_cache,
                                 int64_t layer, const at::Tensor &mask_, const at::Tensor &length, double scale) {
    TORCH_CHECK(rope_attend_kernel, "edge_dlm::rope_attend: kernels not bound");
    const auto dt = q.scalar_type();
    TORCH_CHECK(activations(q) && activations(k) && activations(v) && k.scalar_type() == dt && v.scalar_type() == dt &&
                cos.scalar_type() == dt && sin.scalar_type() == dt && qscale.scalar_type() == dt,
                "rope_attend takes q, k, v, cos, sin and qscale of one dtype, bfloat16 or float32");
    const at::Tensor q2 = rows(q), k2 = rows(k), v2 = rows(v);
    const at::Tensor mask = mask_.contiguous();
    const int64_t T = q2.size(0), D = k_cache.dim() == 4 ? k_cache.size(3) : 0;
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() &&
                v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == at::kFloat && v_cache.is_contiguous() &&
                k_cache.device().is_cpu() && v_cache.device().is_cpu() && 0 <= layer && layer < k_cache.size(0) &&
                D > 0 && D % 16 == 0, "rope_attend: K / V caches [layers, heads, capacity, D] float32, D a multiple of 16");
    const int64_t nq = q2.size(1) / D, nkv = k_cache.size(1), C = k_cache.size(2);
    TORCH_CHECK(T > 0 && q2.size(1) == nq * D && nq % nkv == 0 && k2.sizes() == v2.sizes() && k2.size(0) == T &&
                k2.size(1) == nkv * D, "rope_attend: q [T, heads * D], k / v [T, ", nkv, " * D] for the cache's ", nkv,
                " heads of ", D);
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T * D && sin.numel() == T * D &&
                qscale.is_contiguous() && qscale.numel() == T, "rope_attend: cos / sin [T, D] and qscale [T]");
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == T && mask.size(1) <= C &&
                length.scalar_type() == at::kLong && length.numel() == 1 && length.device().is_cpu(),
                "rope_attend: mask [T, W] bool (W within the cache), length");
    const int64_t len = *length.data_ptr<int64_t>();
    TORCH_CHECK(len >= 0 && len + T <= C, "rope_attend: ", len, " cached + ", T, " new rows past the capacity ", C);
    at::Tensor out = at::empty(q.sizes(), q.options());
    const int rc = rope_attend_kernel(
        dt == at::kBFloat16, q2.data_ptr(), q2.stride(0), k2.data_ptr(), k2.stride(0), v2.data_ptr(), v2.stride(0), T,
        nq, nkv, D, cos.data_ptr(), sin.data_ptr(), qscale.data_ptr(), k_cache.data_ptr<float>() + layer * k_cache.stride(0),
        v_cache.data_ptr<float>() + layer * v_cache.stride(0), k_cache.stride(1), len,
        reinterpret_cast<const uint8_t *>(mask.data_ptr<bool>()), mask.size(1), (float)scale, out.data_ptr(),
        at::get_num_threads());
    TORCH_CHECK(rc == 0, "rope_attend: out of memory for the rotated queries of ", T, " rows");
    return out;
}

TORCH_LIBRARY_IMPL(edge_dlm, CPU, m) {
    m.impl("x16_gemm", x16_gemm_op);
    m.impl("bf16_gemm", bf16_gemm_op);
    m.impl("attend", attend_op);
    m.impl("rms_norm", rms_norm_op);
    m.impl("silu_mul", silu_mul_op);
    m.impl("rope_attend", rope_attend_op);
}
