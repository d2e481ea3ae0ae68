#include <algorithm>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

typedef void (*x16_fn)(int, const float *, int64_t, int64_t, const void *, const void *, const void *, int64_t,
                       int64_t, float *, int);
typedef void (*bf16_fn)(const void *, int64_t, int64_t, const void *, int64_t, float *, int);
typedef void (*attend_fn)(const float *, int64_t, int64_t, int64_t, int64_t, const float *, const float *, int64_t,
                          const uint8_t *, int64_t, int64_t, float, float *, int);
static x16_fn x16_kernel = nullptr;
static bf16_fn bf16_kernel = nullptr;
static attend_fn attend_kernel = nullptr;

extern "C" void edge_dlm_bind(void *x16, void *bf16, void *attend) {
    x16_kernel = reinterpret_cast<x16_fn>(x16);
    bf16_kernel = reinterpret_cast<bf16_fn>(bf16);
    attend_kernel = reinterpret_cast<attend_fn>(attend);
}

static void check(const at::Tensor &t, const char *name) {
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), name, " must be a contiguous CPU tensor");
}

static at::Tensor x16_gemm(const at::Tensor &x_, const at::Tensor &weight, const at::Tensor &scales,
                           const std::optional<at::Tensor> &zeros, int64_t bits, int64_t group, int64_t n) {
    TORCH_CHECK(x16_kernel, "edge_dlm::x16_gemm: kernels not bound");
    TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat, "x16_gemm takes x [M, K] float32");
    at::Tensor x = x_.contiguous();
    check(weight, "weight"), check(scales, "scales");
    if (zeros) check(*zeros, "zeros");
    at::Tensor y = at::empty({x.size(0), n}, x.options());
    x16_kernel((int)bits, x.data_ptr<float>(), x.size(0), x.size(1), weight.data_ptr(), scales.data_ptr(),
               zeros ? zeros->data_ptr() : nullptr, n, group, y.data_ptr<float>(), at::get_num_threads());
    return y;
}

static at::Tensor bf16_gemm(const at::Tensor &x_, const at::Tensor &weight) {
    TORCH_CHECK(bf16_kernel, "edge_dlm::bf16_gemm: not built for this CPU");
    TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
                "bf16_gemm takes x [M, K] and weight [N, K] bfloat16");
    at::Tensor x = x_.contiguous();
    check(weight, "weight");
    at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options().dtype(at::kFloat));
    bf16_kernel(x.data_ptr(), x.size(0), x.size(1), weight.data_ptr(), weight.size(0), y.data_ptr<float>(),
                at::get_num_threads());
    return y;
}

static at::Tensor attend(const at::Tensor &q_, const at::Tensor &k, const at::Tensor &v, const at::Tensor &mask_,
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
    at::Tensor out = at::empty(q.sizes(), q.options());
    attend_kernel(q.data_ptr<float>(), H, R, T, D, k.data_ptr<float>(), v.data_ptr<float>(), k.stride(0),
                  reinterpret_cast<const uint8_t *>(mask.data_ptr<bool>()), W, keys, (float)scale,
                  out.data_ptr<float>(), at::get_num_threads());
    return out;
}

TORCH_LIBRARY_IMPL(edge_dlm, CPU, m) {
    m.impl("x16_gemm", x16_gemm);
    m.impl("bf16_gemm", bf16_gemm);
    m.impl("attend", attend);
}
