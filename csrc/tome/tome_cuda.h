// Torch-free launchers of the token merging CUDA kernels (tome_cuda.cu). All pointers are device
// pointers to contiguous arrays; every launch is asynchronous on `stream` and returns cudaGetLastError()
// (no sync). The ATen adapter (tome_cuda_op.cpp) validates shapes, dtypes and devices, allocates outputs
// and workspaces, and checks the device-side counters between the two halves of each op.
// Geometry and math: tome_cuda_math.h.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "tome/tome_cuda_math.h"

namespace slimformer {
namespace tome {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct MatchArgs {
  DType dtype;
  const void* metric;   // [B, N, C] dtype
  const float* sizes;   // [B, N]
  const int8_t* roles;  // [B, N]
  int64_t B, N, C, r;   // N < 2^31, ceil(N / kTileS) <= kMaxGridY
  int64_t* slot;        // [B, N] out
  int64_t* dst;         // [B, N] out
  float* score;         // [B, N] out
  void* workspace;      // match_workspace(B, N).bytes, 256-byte aligned
  int32_t* flags;       // [3] zeroed: += rows that are not row_feasible, tokens with a role outside {0, 1, 2},
                        //   sizes that are not size_valid
};
// prepare kernel: inverse norms, compacted lists, row_info, non-source outputs, flags.
cudaError_t launch_match_prepare(const MatchArgs& a, cudaStream_t stream);
// best match, rank (r > 0) and slot kernels.
cudaError_t launch_match_finish(const MatchArgs& a, cudaStream_t stream);

struct MergeArgs {
  DType dtype;
  const void* x;         // [B, N, D] dtype
  const float* sizes;    // [B, N]
  const int64_t* slot;   // [B, N]
  int64_t B, N, D, n_out;  // N, n_out < 2^31
  void* out;             // [B, n_out, D] dtype
  float* out_sizes;      // [B, n_out]
  void* workspace;       // merge_workspace(B, N, n_out).bytes, 256-byte aligned
  int32_t* flags;        // [2] zeroed: += slots outside [0, n_out), sizes that are not size_valid
};
// index kernel: per row a stable CSR of the tokens by slot; counts invalid slots.
cudaError_t launch_merge_index(const MergeArgs& a, cudaStream_t stream);
// gather kernel: out, out_sizes.
cudaError_t launch_merge_gather(const MergeArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace tome
}  // namespace slimformer
