// ATen adapter of the binary-weight ops on CUDA: validation (each failure a ValueError naming the
// offending tensor, shape, dtype or device), an fp32 copy of bias (a device-side conversion; act_scale
// and act_shift are read by the kernels through a pointer: no host sync), allocation from torch's caching allocator, launches on the current stream, and the path:
//   binary_gemm, M <= kMaxGemvTokens: the fused gemv kernel (weights read once per token tile);
//   binary_gemm, larger M: S unpacked to +-1 in x's dtype, cuBLAS (at::mm), alpha and bias in fp32;
//   binary_gemm_a1: pack the activation bits, then the popcount GEMM (exact integer dot products).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <vector>

#include "binary/binary_checks.h"
#include "binary/binary_cuda.h"

namespace slimformer {
namespace binary {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "slimformer.binary: CUDA ", what, " failed: ", cudaGetErrorString(err));
}

int sm_count(const at::Device& device) {
  int count = 0;
  check_launch(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index()),
               "multiprocessor count query");
  return count;
}

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: return cuda::DType::kFloat32;
  }
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = N;
  return s;
}

// The fp32 copies must outlive the (asynchronous) kernels: the caching allocator keeps their memory
// for this stream until later work on it, so returning after the launch is safe.
struct Prepared {
  at::Tensor x2, qw, alpha, bias;
  cuda::Weights w;
};

Prepared prepare(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& alpha,
                 const c10::optional<at::Tensor>& bias, const Shape& s, int64_t M) {
  Prepared p;
  p.x2 = x.reshape({M, s.K}).contiguous();
  p.qw = qweight.contiguous();
  p.alpha = alpha.contiguous();
  p.bias = bias.has_value() ? f32(*bias) : at::Tensor();
  p.w.qweight = reinterpret_cast<const uint32_t*>(p.qw.data_ptr<int32_t>());
  p.w.alpha = p.alpha.data_ptr<float>();
  p.w.bias = p.bias.defined() ? p.bias.data_ptr<float>() : nullptr;
  p.w.N = s.N;
  p.w.K = s.K;
  return p;
}

at::Tensor binary_gemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& alpha,
                            const c10::optional<at::Tensor>& bias, int64_t in_features) {
  constexpr const char* op = "slimformer.binary_gemm";
  const Shape s = check_inputs(op, x, qweight, alpha, bias, in_features, int64_t{1} << 24);
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x is on ", x.device(), " but this is the CUDA kernel");
  const c10::cuda::CUDAGuard guard(qweight.device());
  const int64_t M = x.numel() / s.K;
  if (M == 0) return at::empty(out_shape(x, s.N), x.options());
  const Prepared p = prepare(x, qweight, alpha, bias, s, M);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (M > cuda::kMaxGemvTokens) {
    at::Tensor S = at::empty({s.N, s.K}, x.options());
    check_launch(cuda::launch_unpack(p.w.qweight, s.N, s.K, S.data_ptr(), dtype_of(x), stream), "unpack launch");
    at::Tensor y = at::mm(p.x2, S.t()).to(at::kFloat).mul_(p.alpha);
    if (p.bias.defined()) y.add_(p.bias);
    return y.to(x.scalar_type()).reshape(out_shape(x, s.N));
  }

  at::Tensor y = at::empty({M, s.N}, x.options());
  const cuda::GemvPlan plan = cuda::plan_gemv(M, s.N, s.K, sm_count(qweight.device()));
  const at::Tensor ws = plan.splits > 1 ? at::empty({M, s.N}, x.options().dtype(at::kFloat)) : at::Tensor();
  cuda::GemvParams g;
  g.w = p.w;
  g.x = p.x2.data_ptr();
  g.x_type = dtype_of(x);
  g.M = M;
  g.y = y.data_ptr();
  g.workspace = ws.defined() ? ws.data_ptr<float>() : nullptr;
  check_launch(cuda::launch_gemv(g, plan, stream), "gemv launch");
  return y.reshape(out_shape(x, s.N));
}

at::Tensor binary_gemm_a1_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& alpha,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& act_scale,
                               const at::Tensor& act_shift, int64_t in_features) {
  constexpr const char* op = "slimformer.binary_gemm_a1";
  const Shape s = check_inputs(op, x, qweight, alpha, bias, in_features, int64_t{1} << 24);
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x is on ", x.device(), " but this is the CUDA kernel");
  check_act_param(op, "act_scale", act_scale, x.device());
  check_act_param(op, "act_shift", act_shift, x.device());
  const c10::cuda::CUDAGuard guard(qweight.device());
  const int64_t M = x.numel() / s.K;
  if (M == 0) return at::empty(out_shape(x, s.N), x.options());
  const Prepared p = prepare(x, qweight, alpha, bias, s, M);
  const at::Tensor scale = act_scale.reshape({1}).contiguous(), shift = act_shift.reshape({1}).contiguous();
  const at::Tensor abits = at::empty({M, words_per_row(s.K)}, x.options().dtype(at::kInt));
  at::Tensor y = at::empty({M, s.N}, x.options());

  cuda::A1Params a;
  a.w = p.w;
  a.x = p.x2.data_ptr();
  a.x_type = dtype_of(x);
  a.M = M;
  a.act_scale = scale.data_ptr<float>();
  a.act_shift = shift.data_ptr<float>();
  a.abits = reinterpret_cast<uint32_t*>(abits.data_ptr<int32_t>());
  a.y = y.data_ptr();
  check_launch(cuda::launch_gemm_a1(a, c10::cuda::getCurrentCUDAStream()), "W1A1 launch");
  return y.reshape(out_shape(x, s.N));
}

}  // namespace
}  // namespace binary
}  // namespace slimformer

TORCH_LIBRARY_IMPL(slimformer, CUDA, m) {
  m.impl("binary_gemm", &slimformer::binary::binary_gemm_cuda);
  m.impl("binary_gemm_a1", &slimformer::binary::binary_gemm_a1_cuda);
}
