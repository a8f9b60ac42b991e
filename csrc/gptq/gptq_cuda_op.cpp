// ATen adapter of the GPTQ ops on CUDA: validation (shared with the CPU adapter), allocation from
// torch's caching allocator, launches on torch's current stream, and the choice of path:
//   M <= kMaxGemvRows: the fused small-batch kernel (reads the packed weights once per row tile);
//   larger M: dequantize W into x's dtype, then cuBLAS through at::mm / at::addmm.
// Nothing here synchronises with the device: g_idx and perm values are not range-checked (that
// would need a copy to the host); the kernels clamp them instead, so a bad value gives wrong
// numbers but never an out-of-bounds access. QuantLinear validates them when it loads.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <vector>

#include "gptq/gptq_checks.h"
#include "gptq/gptq_cuda.h"

namespace slimformer {
namespace gptq {
namespace {

cuda::QuantWeights make_weights(const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                                const at::Tensor& g_idx, const GptqShape& s, int64_t bits, int64_t zero_offset) {
  const int32_t* qw = qweight.data_ptr<int32_t>();
  return cuda::QuantWeights{qw,
                            qzeros.data_ptr<int32_t>(),
                            scales.data_ptr(),
                            g_idx.data_ptr<int32_t>(),
                            scale_type_of(scales),
                            s.K,
                            s.N,
                            s.G,
                            qzeros.size(1),
                            static_cast<int>(bits),
                            static_cast<int>(zero_offset),
                            cuda::vector_loads_ok(s.N, reinterpret_cast<uintptr_t>(qw))};
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "slimformer.gptq: CUDA ", what, " failed: ", cudaGetErrorString(err));
}

int sm_count(const at::Device& device) {
  int count = 0;
  check_launch(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index()),
               "multiprocessor count query");
  return count;
}

// The kernels read fp16 / bf16 / fp32 bias; anything else (float64) is converted once.
at::Tensor bias_for_kernel(const at::Tensor& bias) {
  const auto t = bias.scalar_type();
  const bool native = t == at::kHalf || t == at::kBFloat16 || t == at::kFloat;
  return native ? bias.contiguous() : bias.to(at::kFloat).contiguous();
}

at::Tensor gemv(const at::Tensor& x2, const cuda::QuantWeights& w, const c10::optional<at::Tensor>& perm,
                const c10::optional<at::Tensor>& bias, cudaStream_t stream) {
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, w.N}, x2.options());
  const at::Tensor perm32 = perm.has_value() ? perm->to(at::kInt).contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias_for_kernel(*bias) : at::Tensor();
  const cuda::GemvPlan plan = cuda::plan_gemv(M, w.N, w.K, w.bits, sm_count(x2.device()));
  // Split-K partial sums meet in fp32 (zeroed by the launcher on the stream).
  const at::Tensor ws = plan.splits > 1 ? at::empty({M, w.N}, x2.options().dtype(at::kFloat)) : at::Tensor();

  cuda::GemvParams p;
  p.w = w;
  p.x = x2.data_ptr();
  p.x_type = scale_type_of(x2);
  p.perm = perm32.defined() ? perm32.data_ptr<int32_t>() : nullptr;
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.bias_type = b.defined() ? scale_type_of(b) : ScaleType::kFloat32;
  p.M = M;
  p.y = y.data_ptr();
  p.workspace = ws.defined() ? ws.data_ptr<float>() : nullptr;
  check_launch(cuda::launch_gemv(p, plan, stream), "gemv launch");
  return y;
}

at::Tensor dequantize_then_mm(const at::Tensor& x2, const cuda::QuantWeights& w,
                              const c10::optional<at::Tensor>& perm, const c10::optional<at::Tensor>& bias,
                              cudaStream_t stream) {
  at::Tensor wt = at::empty({w.K, w.N}, x2.options());
  check_launch(cuda::launch_dequantize(w, wt.data_ptr(), scale_type_of(x2), stream), "dequantize launch");
  // Clamped like in the kernels: index_select would raise a device-side assert on a bad index.
  const at::Tensor xp = perm.has_value() ? x2.index_select(1, perm->clamp(0, w.K - 1)) : x2;
  return bias.has_value() ? at::addmm(bias->to(x2.scalar_type()), xp, wt) : at::mm(xp, wt);
}

at::Tensor gptq_gemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                          const at::Tensor& scales, const at::Tensor& g_idx, const c10::optional<at::Tensor>& perm,
                          const c10::optional<at::Tensor>& bias, int64_t bits, int64_t zero_offset) {
  const GptqShape s = check_weights(qweight, qzeros, scales, g_idx, bits, zero_offset);
  check_activations(x, perm, bias, s, qweight.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor qw = qweight.contiguous(), qz = qzeros.contiguous(), sc = scales.contiguous(),
                   gi = g_idx.contiguous();

  const int64_t M = x.numel() / s.K;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = s.N;
  if (M == 0 || s.N == 0) return at::empty(out_shape, x.options());

  const at::Tensor x2 = x.reshape({M, s.K}).contiguous();
  const cuda::QuantWeights w = make_weights(qw, qz, sc, gi, s, bits, zero_offset);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor y = M <= cuda::kMaxGemvRows ? gemv(x2, w, perm, bias, stream)
                                                : dequantize_then_mm(x2, w, perm, bias, stream);
  return y.reshape(out_shape);
}

at::Tensor gptq_dequantize_cuda(const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                                const at::Tensor& g_idx, int64_t bits, int64_t zero_offset) {
  const GptqShape s = check_weights(qweight, qzeros, scales, g_idx, bits, zero_offset);
  const c10::cuda::CUDAGuard guard(qweight.device());
  const at::Tensor qw = qweight.contiguous(), qz = qzeros.contiguous(), sc = scales.contiguous(),
                   gi = g_idx.contiguous();
  at::Tensor out = at::empty({s.K, s.N}, sc.options());
  if (s.N == 0) return out;
  const cuda::QuantWeights w = make_weights(qw, qz, sc, gi, s, bits, zero_offset);
  check_launch(cuda::launch_dequantize(w, out.data_ptr(), scale_type_of(sc), c10::cuda::getCurrentCUDAStream()),
               "dequantize launch");
  return out;
}

}  // namespace
}  // namespace gptq
}  // namespace slimformer

TORCH_LIBRARY_IMPL(slimformer, CUDA, m) {
  m.impl("gptq_gemm", &slimformer::gptq::gptq_gemm_cuda);
  m.impl("gptq_dequantize", &slimformer::gptq::gptq_dequantize_cuda);
}
