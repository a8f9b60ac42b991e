// Torch-free launchers of the CUDA sparse flash attention kernels (sparse_attention_cuda.cu). All
// pointers are device pointers (the CSR arrays, global_mask and key_mask in SparseAttentionParams too);
// every launch is asynchronous on `stream` and returns cudaGetLastError() (no sync). The ATen adapter
// (sparse_attention_cuda_op.cpp) validates shapes, dtypes and devices and allocates the outputs.
// Geometry and math: sparse_attention_cuda_math.h.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "attention/sparse_attention_cuda_math.h"
#include "attention/sparse_attention_params.h"

namespace slimformer {
namespace attention {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct FwdArgs {
  SparseAttentionParams p;  // head_dim: one of 32, 64, 80, 96, 128 (supported_head_dim)
  DType dtype;
  const void* q;  // strided as p says (last dim contiguous)
  const void* k;
  const void* v;
  void* out;   // [B, Hq, Sq, D] contiguous, dtype
  float* lse;  // [B, Hq, Sq] contiguous
  int64_t nnz;  // entries of col_idx: CSR ranges are clamped to it (their contents are never checked on the host)
};
// fp16 / bf16: tensor-core kernel; fp32: SIMT kernel.
cudaError_t launch_fwd(const FwdArgs& a, cudaStream_t stream);

struct BwdArgs {
  SparseAttentionParams p;  // needs the column CSR too
  DType dtype;
  const void* dout;  // [B, Hq, Sq, D] contiguous
  const void* q;
  const void* k;
  const void* v;
  const void* out;   // [B, Hq, Sq, D] contiguous
  const float* lse;  // [B, Hq, Sq]
  float* delta;      // [B, Hq, Sq] scratch
  void* dq;          // [B, Hq, Sq, D] contiguous
  void* dk;          // [B, Hkv, Sk, D] contiguous
  void* dv;
  int64_t nnz;  // entries of col_idx / row_idx (see FwdArgs)
};
// delta = rowsum(dout * out), then the dQ kernel and the dK/dV kernel (SIMT, fp32 math).
cudaError_t launch_bwd(const BwdArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace attention
}  // namespace slimformer
