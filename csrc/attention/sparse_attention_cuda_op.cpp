// ATen adapter of the sparse flash attention ops on CUDA: validation (each failure a ValueError naming
// the offending tensor, shape, dtype or device), the params struct, output allocation from torch's
// caching allocator and launches on the current stream. No host syncs: the CSR arrays' contents are
// not inspected here (the kernels skip tile indices outside the plan's grid instead of trusting them).
// Paths: forward fp16/bf16 on tensor cores (mma.sync), fp32 SIMT; backward SIMT for every dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "attention/sparse_attention_checks.h"
#include "attention/sparse_attention_cuda.h"

namespace slimformer {
namespace attention {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "slimformer.sparse_attention: CUDA ", what, " failed: ", cudaGetErrorString(err));
}

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: return cuda::DType::kFloat32;
  }
}

// The shared checks (sparse_attention_checks.h) plus what the CUDA kernels assume.
CheckedProblem prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_full,
                       const at::Tensor& col_ptr, const at::Tensor& row_idx, const at::Tensor& row_full,
                       const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& key_mask,
                       int64_t block_size, int64_t q_offset, int64_t first_q_block, int64_t window_left,
                       int64_t window_right, bool causal, double scale) {
  TORCH_CHECK_VALUE(q.is_cuda(), op, ": q is on ", q.device(), " but this is the CUDA kernel");
  CheckedProblem in = check_problem(op, q, k, v, row_ptr, col_idx, col_full, col_ptr, row_idx, row_full, global_mask,
                                    key_mask, block_size, q_offset, first_q_block, window_left, window_right, causal,
                                    scale);
  TORCH_CHECK_VALUE(cuda::supported_head_dim(q.size(3)), op, ": head_dim ", q.size(3),
                    " is not supported by the CUDA kernels (32, 64, 80, 96 or 128)");
  TORCH_CHECK_VALUE(q.size(1) <= cuda::kMaxGridYZ && q.size(0) <= cuda::kMaxGridYZ, op, ": batch (", q.size(0),
                    ") and query heads (", q.size(1), ") must be at most ", cuda::kMaxGridYZ, " on CUDA");
  return in;
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& row_ptr,
    const at::Tensor& col_idx, const at::Tensor& col_full, const at::Tensor& col_ptr, const at::Tensor& row_idx,
    const at::Tensor& row_full, const c10::optional<at::Tensor>& global_mask,
    const c10::optional<at::Tensor>& key_mask, int64_t block_size, int64_t q_offset, int64_t first_q_block,
    int64_t window_left, int64_t window_right, bool causal, double scale) {
  constexpr const char* op = "slimformer.sparse_attention_fwd";
  const CheckedProblem in = prepare(op, q, k, v, row_ptr, col_idx, col_full, col_ptr, row_idx, row_full, global_mask,
                            key_mask, block_size, q_offset, first_q_block, window_left, window_right, causal, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0 || k.size(1) == 0) return {out.zero_(), lse.fill_(-INFINITY)};
  cuda::FwdArgs a;
  a.p = in.p;
  a.dtype = dtype_of(q);
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.nnz = col_idx.size(0);
  check_launch(cuda::launch_fwd(a, c10::cuda::getCurrentCUDAStream()), "forward launch");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_full,
    const at::Tensor& col_ptr, const at::Tensor& row_idx, const at::Tensor& row_full,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& key_mask, int64_t block_size,
    int64_t q_offset, int64_t first_q_block, int64_t window_left, int64_t window_right, bool causal, double scale) {
  constexpr const char* op = "slimformer.sparse_attention_bwd";
  const CheckedProblem in = prepare(op, q, k, v, row_ptr, col_idx, col_full, col_ptr, row_idx, row_full, global_mask,
                            key_mask, block_size, q_offset, first_q_block, window_left, window_right, causal, scale);
  check_backward_inputs(op, q, dout, out, lse);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor dout_c = dout.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0 || k.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  cuda::BwdArgs a;
  a.p = in.p;
  a.dtype = dtype_of(q);
  a.dout = dout_c.data_ptr();
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out_c.data_ptr();
  a.lse = lse_c.data_ptr<float>();
  a.delta = delta.data_ptr<float>();
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  a.nnz = col_idx.size(0);
  check_launch(cuda::launch_bwd(a, c10::cuda::getCurrentCUDAStream()), "backward launch");
  return {dq, dk, dv};
}

}  // namespace
}  // namespace attention
}  // namespace slimformer

TORCH_LIBRARY_IMPL(slimformer, CUDA, m) {
  m.impl("sparse_attention_fwd", &slimformer::attention::sparse_attention_fwd_cuda);
  m.impl("sparse_attention_bwd", &slimformer::attention::sparse_attention_bwd_cuda);
}
