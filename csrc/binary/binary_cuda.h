// Torch-free launchers of the CUDA binary-weight kernels (binary_cuda.cu). All pointers are device
// pointers; every launch is asynchronous on `stream` and returns cudaGetLastError() (no sync). The
// ATen adapter (binary_cuda_op.cpp) validates, converts alpha / bias / act_scale / act_shift to
// fp32, allocates outputs and workspaces, and picks the path.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "binary/binary_cuda_math.h"

namespace slimformer {
namespace binary {
namespace cuda {

// Element type of x and y.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Weights in layout v1 plus the per-row scale (and optional bias), shared by both ops.
struct Weights {
  const uint32_t* qweight;  // [row_tiles(N), words_per_row(K), 16]
  const float* alpha;       // [N]
  const float* bias;        // [N] or null
  int64_t N, K;
};

struct GemvParams {
  Weights w;
  const void* x;     // [M, K] row-major, x_type
  DType x_type;
  int64_t M;         // 1 .. kMaxGemvTokens (any M >= 1 works; the adapter uses cuBLAS above)
  void* y;           // [M, N] row-major, x_type
  float* workspace;  // [M, N] fp32 scratch, needed when plan.splits > 1 (zeroed by the launcher)
};

// W1A-fp: y = alpha * (x @ S^T) + bias with the geometry of `plan` (plan_gemv).
cudaError_t launch_gemv(const GemvParams& p, const GemvPlan& plan, cudaStream_t stream);

// S [N, K] row-major in out_type, values +-1 (the large-batch path multiplies it with cuBLAS).
cudaError_t launch_unpack(const uint32_t* qweight, int64_t N, int64_t K, void* out, DType out_type,
                          cudaStream_t stream);

struct A1Params {
  Weights w;
  const void* x;           // [M, K] row-major, x_type
  DType x_type;
  int64_t M;               // >= 1
  const float* act_scale;  // one element (device)
  const float* act_shift;  // one element (device)
  uint32_t* abits;         // [M, words_per_row(K)] scratch for the packed activations
  void* y;                 // [M, N] row-major, x_type
};

// W1A1: pack_kernel (x -> abits), then a1_kernel (popcount GEMM + epilogue).
cudaError_t launch_gemm_a1(const A1Params& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace binary
}  // namespace slimformer
