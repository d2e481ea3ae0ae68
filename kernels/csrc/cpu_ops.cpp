// The CPU kernels as torch operators (edge_dlm::x16_gemm / bf16_gemm / attend): each checks what it is
// given (shapes, dtypes, layout sizes, group sizes) and raises one clear error; the kernels themselves
// (kernels/csrc/*.c, bound by pointer: `edge_dlm_bind`) trust their inputs.
#include <algorithm>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_kernels.h"

static decltype(&x16_gemm) x16_kernel = nullptr;
static decltype(&bf16_gemm) bf16_kernel = nullptr;
static decltype(&attend) attend_kernel = nullptr;

extern "C" void edge_dlm_bind(void *x16, void *bf16, void *att) {
    x16_kernel = reinterpret_cast<decltype(&x16_gemm)>(x16);
    bf16_kernel = reinterpret_cast<decltype(&bf16_gemm)>(bf16);
    attend_kernel = reinterpret_cast<decltype(&attend)>(att);
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

static at::Tensor bf16_gemm_op(const at::Tensor &x_, const at::Tensor &weight) {
    TORCH_CHECK(bf16_kernel, "edge_dlm::bf16_gemm: not built for this CPU");
    TORCH_CHECK(x_.dim() == 2 && weight.dim() == 2 && x_.scalar_type() == at::kBFloat16 &&
                weight.scalar_type() == at::kBFloat16, "bf16_gemm takes x [M, K] and weight [N, K] bfloat16");
    at::Tensor x = x_.contiguous();
    check(weight, "weight");
    TORCH_CHECK(x.size(1) == weight.size(1) && x.size(1) % 32 == 0,
                "bf16_gemm: x and weight must share K, a multiple of 32 (", x.size(1), ", ", weight.size(1), ")");
    at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options().dtype(at::kFloat));
    if (x.size(0) == 0 || weight.size(0) == 0) return y;
    const int rc = bf16_kernel((const uint16_t *)x.data_ptr(), x.size(0), x.size(1), (const uint16_t *)weight.data_ptr(),
                               weight.size(0), y.data_ptr<float>(), at::get_num_threads());
    TORCH_CHECK(rc == 0, "bf16_gemm: out of memory for the partial sums of ", x.size(0), " rows");
    return y;
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

TORCH_LIBRARY_IMPL(edge_dlm, CPU, m) {
    m.impl("x16_gemm", x16_gemm_op);
    m.impl("bf16_gemm", bf16_gemm_op);
    m.impl("attend", attend_op);
}
