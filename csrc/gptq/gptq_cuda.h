// Torch-free launchers of the CUDA GPTQ kernels (gptq_cuda.cu). All pointers are device pointers;
// every launch is asynchronous on `stream` and the result is cudaGetLastError() (no sync). The
// ATen adapter (gptq_cuda_op.cpp) validates shapes, allocates outputs and workspaces, and picks
// the path: small batch -> launch_gemv, large batch -> launch_dequantize then cuBLAS.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "gptq/gptq_cuda_math.h"
#include "gptq/gptq_cuda_thread.h"

namespace slimformer {
namespace gptq {
namespace cuda {

// ScaleType tags every fp16 / bf16 / fp32 buffer below, not only scales.
struct GemvParams {
  QuantWeights w;
  const void* x;        // [M, K] row-major, x_type
  ScaleType x_type;
  const int32_t* perm;  // [K] or null: x[:, perm] is used; values are clamped into [0, K)
  const void* bias;     // [N] or null, bias_type
  ScaleType bias_type;
  int64_t M;            // 1 .. kMaxGemvRows
  void* y;              // [M, N] row-major, x_type
  float* workspace;     // [M, N] fp32 scratch, needed when plan.splits > 1 (zeroed here)
};

// y = x[:, perm] @ W + bias with the geometry of `plan` (plan_gemv).
cudaError_t launch_gemv(const GemvParams& p, const GemvPlan& plan, cudaStream_t stream);

// out [K, N] (row-major, out_type) = W.
cudaError_t launch_dequantize(const QuantWeights& w, void* out, ScaleType out_type, cudaStream_t stream);

}  // namespace cuda
}  // namespace gptq
}  // namespace slimformer
